"""`megamoe generate MODEL --prompt TEXT`: text from an export folder or a run directory (KV cache;
Lory routes once per layer from the prompt, or per segment with --routing segment)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the subcommand."""
    p = sub.add_parser("generate", help="generate text from an export folder or a run directory")
    p.add_argument("model", type=Path, help="an export folder (megamoe export) or a run directory")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="the prompt text")
    text.add_argument("--prompt-file", type=Path, help="a file holding the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens (and the context)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the same prompt, decoded as one batch")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--routing", choices=("prompt", "segment"), default=None, help="Lory: override moe.generate_routing")
    p.add_argument("--checkpoint", type=Path, default=None, help="run directory only: this checkpoint (default newest)")
    p.set_defaults(func=run)


def load_for_generation(path: Path, checkpoint: Path | None):
    """(model, tokenizer) from an export folder or a run directory."""
    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.errors import MegamoeError
    from megamoe.train.export import CONFIG, load_exported, load_run_model
    from megamoe.train.run import TOKENIZER_FILE

    if (path / CONFIG).is_file():
        if checkpoint is not None:
            raise MegamoeError("--checkpoint: only for a run directory; an export folder holds one model")
        model = load_exported(path)
    elif path.is_dir():
        model, _ = load_run_model(path, checkpoint)
    else:
        raise MegamoeError(f"{path}: neither an export folder (with {CONFIG}) nor a run directory")
    return model, load_tokenizer(path / TOKENIZER_FILE, key=str(path))


def run(args: argparse.Namespace) -> int:
    """Generate and print each sample."""
    import torch

    from megamoe.data.tokenizer import eod_id
    from megamoe.errors import MegamoeError
    from megamoe.model.generate import generate, set_generate_routing

    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise MegamoeError("--max-new-tokens and --num-samples must be >= 1")
    model, tok = load_for_generation(args.model, args.checkpoint)
    if args.routing is not None:
        set_generate_routing(model, args.routing)
    text = args.prompt if args.prompt is not None else args.prompt_file.read_text()
    ids = tok.encode(text).ids
    limit = model.cfg.seq_len - 1
    if not 1 <= len(ids) <= limit:
        raise MegamoeError(f"--prompt: {len(ids)} tokens; the model takes 1 to {limit} (model.seq_len - 1)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    prompt_BL = torch.tensor([ids] * args.num_samples, device=device)
    stop = eod_id(tok, str(args.model))
    new_BL = generate(model, prompt_BL, args.max_new_tokens, args.temperature, args.top_k, args.seed, stop)
    for i, row in enumerate(new_BL.tolist()):
        row = row[: row.index(stop)] if stop in row else row
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text + tok.decode(row))
    return 0
