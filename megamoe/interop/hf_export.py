"""`megamoe export RUN --format hf`: a folder that transformers' AutoModelForCausalLM and AutoTokenizer load.

The weights are written by transformers' own save_pretrained from a model of the chosen class
(hf_classes.py), so the folder is exactly what that class saves. Non-native families are saved as
megamoe's MegamoeForCausalLM with its code (remote/), loaded with trust_remote_code=True. The
folder is written like every export: under a temp name, synced, renamed (train/export.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import warnings
from pathlib import Path

import torch

from megamoe.config import Config
from megamoe.data.tokenizer import eod_id, load_tokenizer
from megamoe.errors import MegamoeError
from megamoe.interop.dropless import dropless_change, make_dropless, uses_capacity_in_eval
from megamoe.interop.hf_classes import Target, choose_target, hf_config, hf_model_class, hf_state
from megamoe.model import Transformer
from megamoe.train.export import export_run
from megamoe.train.run import TOKENIZER_FILE, load_run_config

log = logging.getLogger(__name__)

DEFAULT_DROPLESS_TOLERANCE = 0.01
"""Largest mean |Δ per-token loss| (nats) that dropping the capacity may cause; beyond it the export is refused."""


@dataclasses.dataclass
class HFExport:
    """What an HF export wrote, for the command's output."""

    out: Path
    target: Target | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def export_hf(
    run_dir: Path,
    out: Path,
    checkpoint: Path | None = None,
    remote: bool = False,
    dropless_tolerance: float = DEFAULT_DROPLESS_TOLERANCE,
) -> HFExport:
    """Export a run for transformers (remote: always megamoe's own class, even where a native one fits)."""
    cfg = load_run_config(str(run_dir), [])
    report = HFExport(out)

    def write(model: Transformer, meta: dict, run: Path, folder: Path) -> None:
        report.notes += _dropless(model, cfg, dropless_tolerance)
        report.target = (
            Target("megamoe", "--remote-code asked for it") if remote else choose_target(model.cfg, model.moe_cfg)
        )
        write_hf_folder(model, meta, run, folder, report)

    export_run(run_dir, out, checkpoint, write)
    return report


def _dropless(model: Transformer, cfg: Config, tolerance: float) -> list[str]:
    """Make the model dropless; refuse when that changes its function beyond the tolerance."""
    trained = cfg.moe.capacity_factor if cfg.moe.routing == "topk" else 0.0
    notes = []
    if uses_capacity_in_eval(model):
        factor = model.moe_cfg.eval_capacity_factor
        change = dropless_change(model, cfg)
        if change > tolerance:
            raise MegamoeError(
                f"moe.eval_capacity_factor={factor}: exported dropless (transformers' MoE classes drop nothing), the "
                f"mean per-token loss changes by {change:.4f} nats on validation data, above --dropless-tolerance "
                f"{tolerance}; raise the tolerance to export anyway"
            )
        notes.append(f"exported dropless: evaluation used capacity factor {factor}; loss changes {change:.2e} nats")
    elif trained > 0:
        notes.append(f"trained with capacity factor {trained}; evaluation and this export are dropless")
    return notes


def write_hf_folder(model: Transformer, meta: dict, run_dir: Path, folder: Path, report: HFExport) -> None:
    """The weights, config, generation config and tokenizer files of an HF export, into folder."""
    make_dropless(model)
    tok = load_tokenizer(run_dir / TOKENIZER_FILE, "tokenizer.json")
    eos = eod_id(tok, str(run_dir / TOKENIZER_FILE))
    hf = _native(model, report.target, eos) if report.target.kind != "megamoe" else _wrapper(model, eos)
    hf.config.megamoe_export = {
        "checkpoint": meta["checkpoint"], "step": meta["step"], "tokens": meta.get("tokens"),
        "class": report.target.kind, "why": report.target.why, "dropless": True, "notes": report.notes,
    }  # fmt: skip
    hf.generation_config.eos_token_id = eos
    hf.save_pretrained(folder, safe_serialization=True)
    shutil.copyfile(run_dir / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    write_tokenizer_config(folder, tok.id_to_token(eos), model.cfg.seq_len)


def _native(model: Transformer, target: Target, eos: int):
    """The transformers model of a native class, holding the megamoe weights."""
    config = hf_config(model.cfg, model.moe_cfg, target, eos)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # Qwen2-MoE without shared FFN
        hf = hf_model_class(target)(config)
    state = hf_state({k: v.detach() for k, v in model.state_dict().items()}, model.cfg, model.moe_cfg, target)
    hf.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


def _wrapper(model: Transformer, eos: int):
    """megamoe's own transformers class around the model (its code is saved with it)."""
    from megamoe.interop.remote.configuration_megamoe import MegamoeConfig
    from megamoe.interop.remote.modeling_megamoe import MegamoeForCausalLM

    MegamoeConfig.register_for_auto_class()
    MegamoeForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    config = MegamoeConfig(
        megamoe_model=dataclasses.asdict(model.cfg), megamoe_moe=dataclasses.asdict(model.moe_cfg),
        eos_token_id=eos, architectures=["MegamoeForCausalLM"],
    )  # fmt: skip
    with torch.device("meta"):
        hf = MegamoeForCausalLM(config)
    hf.load_state_dict({f"model.{k}": v.detach() for k, v in model.state_dict().items()}, strict=True, assign=True)
    hf.model.rotary = model.rotary
    return hf.eval()


def write_tokenizer_config(folder: Path, eos_token: str, max_length: int) -> None:
    """tokenizer_config.json for AutoTokenizer: the fast tokenizer of tokenizer.json, EOS = end of document."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos_token, "bos_token": None,
        "pad_token": None, "unk_token": None, "model_max_length": max_length, "add_bos_token": False,
        "add_eos_token": False, "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
