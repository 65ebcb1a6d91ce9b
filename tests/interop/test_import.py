"""`megamoe import-hf` and sparse upcycling: imported and upcycled runs compute transformers' function.

Tolerance: in fp32 megamoe and transformers differ only in summation order (fused vs separate q/k/v
matmuls, attention kernels, expert accumulation) and in the rotary tables (transformers computes
the angles in fp32, megamoe in fp64 rounded to fp32: at most L·u ≈ 32·6e-8 ≈ 2e-6 rad at L = 32).
Two layers of width 64 give per-element relative errors of a few 1e-7, so ‖Δlogits‖/‖logits‖ stays
far below the issue's bound REL_TOL = 1e-5; a planted layout bug misses it by orders of magnitude.
Upcycled models add Σ_experts reorderings of the same sums and the w_down scale (exact powers of
two here, or 1/(k·s0) rounded once), so the same bound holds for them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from megamoe.cli.main import main
from megamoe.data.tokenizer import train_bpe

REL_TOL = 1e-5
"""‖Δlogits‖ / ‖logits‖ between transformers and megamoe (see the module docstring)."""
HF_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, vocab_size=300, initializer_range=0.1)  # fmt: skip
TRAIN = ["model.seq_len=32", "data.max_documents=60", "data.val_fraction=0.1", "train.micro_batch_size=2",
         "train.global_batch_size=4", "train.max_steps=2", "train.eval_interval=0", "train.eval_batches=1",
         "train.checkpoint_interval=0", "optim.warmup_steps=1", "logging.progress=false",
         "logging.wandb.mode=disabled"]  # fmt: skip
"""Training settings of the tiny imported runs (the model section comes from config.json)."""


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def save_hf(folder: Path, family: str = "llama", shard: str | None = None, **config) -> torch.nn.Module:
    """A tiny random transformers model (norm scales randomized too) with a tokenizer.json, saved in folder."""
    import transformers

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
    cfg = getattr(transformers, f"{names[family]}Config")(**(HF_SHAPE | config))
    torch.manual_seed(0)
    model = getattr(transformers, f"{names[family]}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    texts = [Path(json.__file__).read_text(), Path(shutil.__file__).read_text()]
    train_bpe(texts, 290).save(str(folder / "tokenizer.json"))
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """The tiny LlamaForCausalLM folder and model (untied, one safetensors file)."""
    folder = tmp_path_factory.mktemp("llama")
    return folder, save_hf(folder)


def tokens() -> torch.Tensor:
    """Two random sequences of 32 ids, (2, 32)."""
    return torch.randint(0, HF_SHAPE["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))


def import_run(hf_dir: Path, out: Path, *overrides: str) -> Path:
    """`megamoe import-hf hf_dir --out out overrides...` through the CLI (exit status 0)."""
    assert main(["import-hf", str(hf_dir), "--out", str(out), *TRAIN, *overrides]) == 0
    return out


def run_logits(run_dir: Path, checkpoint: Path | None = None) -> torch.Tensor:
    """A run's checkpoint as one model, its logits on tokens()."""
    from megamoe.train.export import load_run_model

    model, _ = load_run_model(run_dir, checkpoint)
    with torch.no_grad():
        return model(tokens()).logits_BLV


def hf_logits(model) -> torch.Tensor:
    """transformers' logits on tokens()."""
    with torch.no_grad():
        return model(tokens()).logits


@pytest.mark.parametrize("variant", ["untied-single-file", "tied-sharded"])
def test_import_matches_transformers(variant, tmp_path):
    """Dense import: megamoe's logits equal transformers' (one safetensors file, and a sharded tied one)."""
    tied = variant.startswith("tied")
    hf = save_hf(tmp_path / "hf", shard="40KB" if tied else None, tie_word_embeddings=tied)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file() == tied
    run = import_run(tmp_path / "hf", tmp_path / "run")
    cfg = __import__("yaml").safe_load((run / "config.yaml").read_text())["model"]
    assert (cfg["vocab_size"], cfg["tie_embeddings"], cfg["num_kv_heads"], cfg["seq_len"]) == (300, tied, 2, 32)
    assert rel_error(run_logits(run), hf_logits(hf)) <= REL_TOL


def test_qwen2_biases_import_and_export_exactly(tmp_path):
    """Qwen2's q/k/v biases (random, non-zero) become model.qkv_bias: logits equal, and the export is a Qwen2."""
    from transformers import AutoModelForCausalLM

    from megamoe.interop.hf_export import export_hf

    hf = save_hf(tmp_path / "hf", "qwen2")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("_proj.bias"):
                p.copy_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    run = import_run(tmp_path / "hf", tmp_path / "run")
    assert __import__("yaml").safe_load((run / "config.yaml").read_text())["model"]["qkv_bias"] is True
    assert rel_error(run_logits(run), hf_logits(hf)) <= REL_TOL
    back = AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "export").out).eval()
    assert type(back).__name__ == "Qwen2ForCausalLM"
    assert rel_error(hf_logits(back), hf_logits(hf)) <= REL_TOL


def test_planted_layout_bug_is_caught(llama, tmp_path):
    """k and v swapped in one layer's fused projection: the logits check fails by orders of magnitude."""
    from megamoe.interop.layout import fuse_qkv, split_qkv
    from megamoe.train.export import load_run_model

    folder, hf = llama
    model, _ = load_run_model(import_run(folder, tmp_path / "run"))
    qkv = model.layers[0].attn.qkv.weight
    with torch.no_grad():
        q, k, v = split_qkv(qkv, model.cfg)
        qkv.copy_(fuse_qkv(q, v, k, model.cfg))
        assert rel_error(model(tokens()).logits_BLV, hf_logits(hf)) > 100 * REL_TOL


UPCYCLED = {
    "top2-renormalized": ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.renormalize=true"],
    "fine-grained-g2": ["moe.routing=topk", "moe.num_experts=8", "moe.top_k=4", "moe.renormalize=true",
                        "moe.expert_hidden_size=48"],
    "top2-unnormalized": ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2"],
    "sigmoid-top1": ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=1", "moe.score_fn=sigmoid"],
    "residual-shared-every2": ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.renormalize=true",
                               "moe.residual=true", "moe.num_shared_experts=1", "moe.moe_every=2"],
    "rmoe-gru": ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=2", "moe.renormalize=true",
                 "moe.scorer=gru", "moe.gru_hidden=16"],
    "lory": ["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8", "moe.dense_warmup_fraction=0"],
}  # fmt: skip


def test_planted_upcycling_bug_is_caught(llama, tmp_path):
    """Fine-grained experts without the w_down × g scale (megatron-core's c^(1/3) split differs likewise): caught."""
    from megamoe.train.export import load_run_model

    model, _ = load_run_model(import_run(llama[0], tmp_path / "run", *UPCYCLED["fine-grained-g2"]))
    with torch.no_grad():
        for layer in model.layers:
            layer.ffn.experts.w_down.div_(2)
        assert rel_error(model(tokens()).logits_BLV, hf_logits(llama[1])) > 100 * REL_TOL


@pytest.mark.parametrize("variant", list(UPCYCLED))
def test_upcycled_import_is_the_dense_function(variant, llama, tmp_path):
    """Upcycled at import: step-0 logits equal the dense transformers model's."""
    folder, hf = llama
    run = import_run(folder, tmp_path / "run", *UPCYCLED[variant])
    assert rel_error(run_logits(run), hf_logits(hf)) <= REL_TOL


def test_lory_import_goes_through_the_warmup_switch(llama, tmp_path):
    """Lory: identical experts and the router megamoe.train.upcycle draws at its switch (seed + offset)."""
    from megamoe.model.init import initial_value
    from megamoe.train.export import load_run_model
    from megamoe.train.upcycle import UPCYCLE_SEED_OFFSET

    model, _ = load_run_model(import_run(llama[0], tmp_path / "run", *UPCYCLED["lory"]))
    ffn = model.layers[1].ffn
    assert torch.equal(ffn.experts.w_up, ffn.experts.w_up[:1].expand_as(ffn.experts.w_up))
    router = ffn.scorer.router.weight
    fresh = initial_value("layers.1.ffn.scorer.router.weight", router, model.cfg, 1234 + UPCYCLE_SEED_OFFSET)
    assert torch.equal(router, fresh)


def test_upcycle_noise_perturbs_experts_only(llama, tmp_path):
    """moe.upcycle_noise: experts differ from each other by about ε; everything else is untouched."""
    from megamoe.train.export import load_run_model

    args = (*UPCYCLED["top2-renormalized"], "moe.upcycle_noise=0.01")
    model, _ = load_run_model(import_run(llama[0], tmp_path / "run", *args))
    w_up = model.layers[0].ffn.experts.w_up.detach()
    spread = float((w_up[1] - w_up[0]).norm() / w_up[0].norm())
    assert 0.005 < spread < 0.03  # ≈ √2·ε for independent N(0, ε²) relative perturbations
    assert 0 < rel_error(run_logits(tmp_path / "run"), hf_logits(llama[1])) < 0.05


REFUSED = {
    "model_type": ({"model_type": "gpt2"}, [], "model_type"),
    "architectures": ({"architectures": ["MixtralForCausalLM"]}, [], "architectures"),
    "hidden_act": ({"hidden_act": "gelu"}, [], "hidden_act"),
    "rope_type": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, [], "rope_parameters.rope_type"),
    "head_dim": ({"head_dim": 32}, [], "head_dim"),
    "mlp_bias": ({"mlp_bias": True}, [], "mlp_bias"),
    "sliding_window": ({"model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 16},
                       [], "sliding_window"),
    "expert_choice": ({}, ["moe.routing=expert_choice", "moe.capacity_factor=2"], "moe.routing"),
    "capacity": ({}, ["moe.routing=topk", "moe.capacity_factor=1.25"], "moe.capacity_factor"),
    "fine-unnormalized": ({}, ["moe.routing=topk", "moe.expert_hidden_size=48"], "moe.renormalize"),
    "fine-top_k": ({}, ["moe.routing=topk", "moe.renormalize=true", "moe.top_k=3", "moe.expert_hidden_size=48"],
                   "moe.top_k"),
    "fine-lory": ({}, ["moe.routing=lory", "moe.expert_hidden_size=48"], "moe.expert_hidden_size"),
    "not-a-slice": ({}, ["moe.routing=topk", "moe.renormalize=true", "moe.expert_hidden_size=40"],
                    "moe.expert_hidden_size"),
    "conflict": ({}, ["model.d_model=128"], "model.d_model"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_input_is_one_line_naming_the_key(case, llama, tmp_path, capsys):
    """Each refusal exits 2 with one line naming the HF config key or the moe.* / model.* key."""
    edits, overrides, key = REFUSED[case]
    folder = tmp_path / "hf"
    shutil.copytree(llama[0], folder)
    config = json.loads((folder / "config.json").read_text()) | edits
    (folder / "config.json").write_text(json.dumps(config))
    assert main(["import-hf", str(folder), "--out", str(tmp_path / "run"), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and key in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_files_are_one_line(llama, tmp_path, capsys):
    """No safetensors, no tokenizer.json, or an --out that holds a run: one line naming the file."""
    import_run(llama[0], tmp_path / "done")
    assert main(["import-hf", str(llama[0]), "--out", str(tmp_path / "done")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    folder = tmp_path / "hf"
    shutil.copytree(llama[0], folder)
    (folder / "tokenizer.json").unlink()
    assert main(["import-hf", str(folder), "--out", str(tmp_path / "a")]) == 2
    assert "tokenizer.json: not found" in capsys.readouterr().err
    shutil.copy(llama[0] / "tokenizer.json", folder)
    (folder / "model.safetensors").unlink()
    assert main(["import-hf", str(folder), "--out", str(tmp_path / "b")]) == 2
    assert "model.safetensors.index.json found" in capsys.readouterr().err


def test_imported_runs_train_resume_and_seed_new_runs(llama, data_cache, tmp_path):
    """An upcycled import trains with --resume; model.init_from upcycles a dense import into Lory at a chosen
    step (the dense function at step 0), trains, and resumes after the source's checkpoints are gone."""
    from megamoe.config import load_config
    from megamoe.train.checkpoint import latest_checkpoint
    from megamoe.train.metrics import read_metrics
    from tests.util import single_process_trainer

    folder, hf = llama
    cache = f"data.cache_dir={data_cache}"
    moe_run = import_run(folder, tmp_path / "moe", cache, *UPCYCLED["top2-renormalized"])
    assert main(["train", str(moe_run), "--resume"]) == 0
    assert latest_checkpoint(moe_run).name == "step_00000002"
    assert all(r["train/loss"] < 6.5 for r in read_metrics(moe_run) if "train/loss" in r)  # ln 300 = 5.7 + noise
    dense = import_run(folder, tmp_path / "dense", cache)
    start = dense / "checkpoints" / "step_00000000"
    lory = [f"model.init_from={start}", f"train.run_dir={tmp_path / 'lory'}", *UPCYCLED["lory"]]
    trainer = single_process_trainer(load_config(dense / "config.yaml", lory))
    with torch.no_grad():
        assert rel_error(trainer.model(tokens()).logits_BLV, hf_logits(hf)) <= REL_TOL
    assert trainer.fit()["step"] == 2
    shutil.rmtree(dense / "checkpoints")  # the source's weights are gone (its tokenizer.json is the data's)
    resumed = single_process_trainer(load_config(dense.parent / "lory" / "config.yaml", ["train.max_steps=3"]), True)
    assert resumed.step == 2 and resumed.fit()["step"] == 3


def test_round_trip_import_export(llama, tmp_path):
    """import-hf → export --format hf: transformers loads a Llama whose logits equal the original's."""
    from transformers import AutoModelForCausalLM

    from megamoe.interop.hf_export import export_hf

    folder, hf = llama
    run = import_run(folder, tmp_path / "run")
    back = AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf").out).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    assert rel_error(hf_logits(back), hf_logits(hf)) <= REL_TOL
