"""`megamoe export --format hf`: every family loads in transformers and computes megamoe's function.

Tolerance: in fp32 the two implementations differ only in summation order (attention kernels,
expert accumulation) and in the rotary tables (transformers computes them in fp32, megamoe in
fp64 rounded to fp32): per matmul ~√D·u with u = 6e-8, a few dozen ops deep → well under 1e-6 of
the logits' norm; the issue's bound is ‖Δlogits‖ ≤ 1e-5·‖logits‖. A planted layout bug (k and v
swapped in one layer) misses it by orders of magnitude (test_swapped_kv_is_caught).
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.util import single_process_trainer, tiny_config

REL_TOL = 1e-5
"""‖Δlogits‖ / ‖logits‖ between transformers and megamoe (see the module docstring)."""
TIE_GAP = 1e-4
"""Greedy decoding may differ only where megamoe's top two logits are closer than this (≫ REL_TOL·‖logits‖∞)."""

MOE4 = ["moe.num_experts=4", "moe.top_k=2"]
FAMILIES = {
    "dense-tied": (["model.tie_embeddings=true"], "llama"),
    "dense-qkv-bias": (["model.qkv_bias=true"], "qwen2"),
    "topk-renorm": (["moe.routing=topk", *MOE4, "moe.renormalize=true", "moe.capacity_factor=1.25"], "mixtral"),
    "topk-shared-residual": (["moe.routing=topk", *MOE4, "moe.moe_every=2", "moe.num_shared_experts=1",
                              "moe.residual=true", "moe.expert_hidden_size=48"], "qwen2_moe"),
    "expert-choice-qkv-bias": (["moe.routing=expert_choice", "moe.num_experts=4", "moe.capacity_factor=2",
                                "model.qkv_bias=true"], "qwen2_moe"),
    "topk-sigmoid": (["moe.routing=topk", *MOE4, "moe.score_fn=sigmoid", "moe.renormalize=true"], "megamoe"),
    "grin": (["moe.routing=sparsemixer", *MOE4, "moe.jitter_eps=0.3"], "megamoe"),
    "rmoe": (["moe.routing=topk", *MOE4, "moe.scorer=gru", "moe.gru_hidden=16"], "megamoe"),
    "lory-prompt": (["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8"], "megamoe"),
    "lory-segment": (["moe.routing=lory", "moe.num_experts=4", "moe.segment_length=8",
                      "moe.generate_routing=segment"], "megamoe"),
}  # fmt: skip


def train_run(data_cache, run_dir, *overrides):
    """A tiny run of 3 steps; its run dir.

    A wide init (std 0.3): 3 steps from the default init leave nearly uniform logits, and greedy decoding
    repeats one token; this model's greedy continuations vary (16-20 distinct tokens in 20), so
    comparing them tests the decode cache.
    """
    wide = ("train.max_steps=3", "train.eval_interval=0", "model.init_std=0.3")
    cfg = tiny_config(data_cache, run_dir, *wide, *overrides)
    single_process_trainer(cfg).fit()
    return run_dir


def held_out_tokens(tiny_data, length: int) -> torch.Tensor:
    """Two validation sequences (1, L) each, as a batch (2, L)."""
    return tiny_data.split("val").batch(torch.arange(2).numpy(), length).tokens_BL


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def assert_same_greedy(hf, model, prompt_1L: torch.Tensor, steps: int) -> None:
    """transformers' greedy generate() equals megamoe's, up to a genuine tie (a top-2 gap < TIE_GAP)."""
    from megamoe.model.generate import generate

    ours = generate(model, prompt_1L, steps)[0]
    theirs = hf.generate(prompt_1L, max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
    theirs = theirs[0, prompt_1L.shape[1] :]
    assert len(theirs) == len(ours)
    for i in range(steps):
        if theirs[i] != ours[i]:
            with torch.no_grad():
                logits_V = model(torch.cat([prompt_1L[0], ours[:i]])[None]).logits_BLV[0, -1]
            top2 = logits_V.topk(2).values
            assert float(top2[0] - top2[1]) < TIE_GAP, f"greedy step {i}: {int(theirs[i])} != {int(ours[i])}"
            return


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_export_matches_megamoe(family, data_cache, tiny_data, tmp_path):
    """AutoModelForCausalLM loads the export as the expected class; logits and greedy decoding equal megamoe's."""
    from transformers import AutoModelForCausalLM

    from megamoe.interop.hf_export import export_hf
    from megamoe.train.export import load_run_model

    overrides, kind = FAMILIES[family]
    run = train_run(data_cache, tmp_path / "run", *overrides)
    report = export_hf(run, tmp_path / "hf")
    assert report.target.kind == kind
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    expected_class = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM",
                      "qwen2_moe": "Qwen2MoeForCausalLM", "megamoe": "MegamoeForCausalLM"}[kind]  # fmt: skip
    assert type(hf).__name__ == expected_class
    model, _ = load_run_model(run)
    tokens_BL = held_out_tokens(tiny_data, model.cfg.seq_len)
    with torch.no_grad():
        assert rel_error(hf(tokens_BL).logits, model(tokens_BL).logits_BLV) <= REL_TOL
    assert_same_greedy(hf, model, tokens_BL[:1, :12], steps=model.cfg.seq_len - 12)


def test_swapped_kv_is_caught(data_cache, tiny_data, tmp_path):
    """Planted bug: k and v projections swapped in one layer → the logits check fails by far."""
    from transformers import AutoModelForCausalLM

    from megamoe.interop.hf_export import export_hf
    from megamoe.train.export import load_run_model

    run = train_run(data_cache, tmp_path / "run")
    export_hf(run, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    attn = hf.model.layers[0].self_attn
    with torch.no_grad():
        k, v = attn.k_proj.weight.clone(), attn.v_proj.weight.clone()
        attn.k_proj.weight.copy_(v)
        attn.v_proj.weight.copy_(k)
        model, _ = load_run_model(run)
        tokens_BL = held_out_tokens(tiny_data, model.cfg.seq_len)
        assert rel_error(hf(tokens_BL).logits, model(tokens_BL).logits_BLV) > 100 * REL_TOL


def test_tokenizer_and_export_record(data_cache, tmp_path):
    """AutoTokenizer encodes like the run's tokenizer with EOS = end of document; config says dropless."""
    from transformers import AutoTokenizer

    from megamoe.data.tokenizer import EOD, load_tokenizer
    from megamoe.interop.hf_export import export_hf

    run = train_run(data_cache, tmp_path / "run", "moe.routing=topk", *MOE4, "moe.capacity_factor=1.0")
    report = export_hf(run, tmp_path / "hf")
    assert any("capacity factor 1.0" in note for note in report.notes)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(run / "tokenizer.json")
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tok(text)["input_ids"] == ours.encode(text).ids
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == EOD and tok.eos_token_id == ours.token_to_id(EOD)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["megamoe_export"]["dropless"] is True
    assert config["vocab_size"] % 64 == 0 and config["vocab_size"] >= ours.get_vocab_size()
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id


def test_eval_capacity_refused_beyond_tolerance(data_cache, tmp_path):
    """A model that drops tokens in evaluation is refused dropless beyond --dropless-tolerance; accepted within."""
    from megamoe.cli.main import main
    from megamoe.errors import MegamoeError
    from megamoe.interop.hf_export import export_hf

    run = train_run(data_cache, tmp_path / "run", "moe.routing=topk", *MOE4, "moe.eval_capacity_factor=0.25")
    with pytest.raises(MegamoeError, match=r"moe.eval_capacity_factor=0.25.*--dropless-tolerance 1e-06"):
        export_hf(run, tmp_path / "refused", dropless_tolerance=1e-6)
    assert not (tmp_path / "refused").exists()
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--dropless-tolerance", "5"]) == 0
    notes = json.loads((tmp_path / "hf" / "config.json").read_text())["megamoe_export"]["notes"]
    assert notes and notes[0].startswith("exported dropless: evaluation used capacity factor 0.25")


def test_remote_code_on_request_and_rerun(data_cache, tiny_data, tmp_path):
    """--remote-code writes megamoe's class even for a Llama-shaped model; a rerun finds the export done."""
    from transformers import AutoModelForCausalLM

    from megamoe.cli.main import main
    from megamoe.train.export import load_run_model

    run = train_run(data_cache, tmp_path / "run")
    args = ["export", str(run), "--format", "hf", "--remote-code", "--out", str(tmp_path / "hf")]
    assert main(args) == 0
    assert main(args) == 0  # the same checkpoint's export is already there: nothing to do
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    assert type(hf).__name__ == "MegamoeForCausalLM"
    model, _ = load_run_model(run)
    tokens_BL = held_out_tokens(tiny_data, model.cfg.seq_len)
    with torch.no_grad():
        assert torch.equal(hf(tokens_BL).logits, model(tokens_BL).logits_BLV)
        padded_BL = torch.ones_like(tokens_BL)
        padded_BL[0, 0] = 0
        with pytest.raises(ValueError, match="no attention mask"):
            hf(tokens_BL, attention_mask=padded_BL)
