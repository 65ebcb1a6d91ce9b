"""A megamoe model as an lm-evaluation-harness `LM`, registered as "megamoe" (every routing family works).

Shape legend: B rows, L tokens, V vocabulary, C continuation tokens.

Tokenization follows lm-eval's Hugging Face model (`TemplateLM._encode_pair`): trailing whitespace
of the context moves to the continuation, then context + continuation is encoded whole and split at
the token count of the context encoded alone. An empty context is replaced by the end-of-document
token. When context + continuation exceed model.seq_len + 1 tokens, the context is cut from the left.

Batching never changes what a row computes, only how many rows share a forward pass
(`batch_mode`): right padding is safe when every position depends only on earlier ones (dense,
or MoE routing each token on its own with no eval capacity); Lory routes its first segment from
that segment's own mean, so only rows of equal length share a pass; a capacity limit in evaluation
counts every token of the pass, so then each row runs alone. The model always runs in eval mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from megamoe.data.tokenizer import eod_id
from megamoe.errors import MegamoeError
from megamoe.model.generate import generate
from megamoe.model.transformer import Transformer

Request = tuple[tuple[str, str] | None, list[int], list[int]]
"""What `_loglikelihood_tokens` scores: (strings or None, context ids, continuation ids)."""


def batch_mode(model: Transformer) -> str:
    """How rows may share a forward pass: 'pad' (right-padded), 'equal' (equal lengths only) or 'single'."""
    moe = model.moe_cfg
    if not moe.enabled:
        return "pad"
    if moe.routing == "lory":
        return "equal"
    return "single" if moe.eval_capacity_factor > 0 else "pad"


def plan_batches(lengths: list[int], batch_size: int, mode: str) -> Iterator[list[int]]:
    """Row indices per forward pass, longest rows first (the padded length is each batch's first row)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if mode == "single":
        batch_size = 1
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (mode == "equal" and lengths[i] != lengths[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@register_model("megamoe")
class MegamoeLM(TemplateLM):
    """lm-eval's view of a megamoe model and its tokenizer."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, batch_size: int = 8, max_gen_toks: int = 256):
        super().__init__()
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(device)
        self.tok, self.batch_size, self.max_gen_toks = tokenizer, int(batch_size), int(max_gen_toks)
        self.max_length, self.mode = model.cfg.seq_len, batch_mode(model)
        self._eot, self._device = eod_id(tokenizer, "tokenizer.json"), device

    @classmethod
    def from_run(cls, run_dir: Path, checkpoint: Path | None = None, **kwargs) -> MegamoeLM:
        """The model of a run's checkpoint (newest by default) with the run's tokenizer."""
        from megamoe.data.tokenizer import load_tokenizer
        from megamoe.train.export import load_run_model
        from megamoe.train.run import TOKENIZER_FILE

        model, _ = load_run_model(run_dir, checkpoint)
        return cls(model, load_tokenizer(run_dir / TOKENIZER_FILE, "tokenizer.json"), **kwargs)

    @property
    def eot_token_id(self) -> int:
        """The end-of-document token (also the prefix of an empty context)."""
        return self._eot

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of a string (megamoe tokenizers add no special tokens)."""
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self.tok.decode(ids, skip_special_tokens=False)

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False, **kwargs) -> list:
        """(sum of the continuation's log-probs, whether greedy decoding gives it) per request."""
        rows = [self._row(context, continuation) for _, context, continuation in requests]
        out: list = [None] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm, desc="megamoe loglikelihood")
        for batch in plan_batches([len(r[0]) for r in rows], self.batch_size, self.mode):
            for i, score in zip(batch, self._score([rows[i] for i in batch])):
                out[i] = score
            bar.update(len(batch))
        bar.close()
        return out

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """(model input, continuation): the last seq_len + 1 tokens of context + continuation, last one dropped."""
        if not continuation or len(continuation) > self.max_length:
            raise MegamoeError(
                f"lm-eval: a continuation of {len(continuation)} tokens; it needs 1 to model.seq_len "
                f"({self.max_length}) tokens"
            )
        return (context + continuation)[-(self.max_length + 1) :][:-1], continuation

    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward pass over right-padded rows; each row's score reads only its own positions."""
        width = max(len(inp) for inp, _ in rows)
        tokens_BL = torch.full((len(rows), width), self._eot, dtype=torch.long)
        for b, (inp, _) in enumerate(rows):
            tokens_BL[b, : len(inp)] = torch.tensor(inp)
        logp_BLV = F.log_softmax(self.model(tokens_BL.to(self._device)).logits_BLV.float(), dim=-1)
        scores = []
        for b, (inp, cont) in enumerate(rows):
            logp_CV = logp_BLV[b, len(inp) - len(cont) : len(inp)]
            cont_C = torch.tensor(cont, device=logp_CV.device)
            logp = logp_CV.gather(-1, cont_C[:, None]).sum()
            scores.append((float(logp), bool((logp_CV.argmax(-1) == cont_C).all())))
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole strings: disjoint windows of seq_len predictions, as lm-eval's HF model."""
        windows: list[Request] = []
        counts = []
        for (string,) in (req.args for req in requests):
            pairs = get_rolling_token_windows(self.tok_encode(string), self.prefix_token_id, self.max_length, 1)
            found = [(None, *make_disjoint_window(pair)) for pair in pairs]
            windows += found
            counts.append(len(found))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, start = [], 0
        for count in counts:
            totals.append(sum(s for s, _ in scores[start : start + count]))
            start += count
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations (one request at a time), cut before the first stop string."""
        return [self._generate(*req.args) for req in tqdm(requests, disable=disable_tqdm, desc="megamoe generate")]

    def _generate(self, context: str, gen_kwargs: dict) -> str:
        """One continuation of at most max_gen_toks tokens (fewer where the context fills seq_len).

        The context is cut from the left to leave room for the new tokens, but keeps at least half of
        seq_len (lm-eval's default of 256 new tokens would leave a small model's context empty).
        """
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        wanted = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        room = self.max_length - max(1, min(wanted, self.max_length // 2))
        prompt = (self.tok_encode(context) or [self._eot])[-room:]
        temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
        prompt_BL = torch.tensor([prompt], device=self._device)
        new_ids = generate(self.model, prompt_BL, wanted, temperature=temperature, stop_id=self._eot)[0].tolist()
        if self._eot in new_ids:
            new_ids = new_ids[: new_ids.index(self._eot)]
        text = self.tok_decode(new_ids)
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text
