"""Routing analyses: oracles on synthetic routers, the drop curve of a real capacity-limited block, recording."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megamoe.analysis import drops, early, router_stats, specialization
from megamoe.analysis.record import Recording, record_routing
from megamoe.analysis.report import write_report
from megamoe.config import ModelConfig, load_config
from megamoe.model import LayerFactory, build_model
from megamoe.model.init import init_parameters
from megamoe.model.moe import MoEFFN

EXPERTS, VOCAB = 8, 50


def synthetic(choice_fn, step: int, seed: int = 0, tokens: int = 6000, k: int = 2) -> Recording:
    """A Recording of one token-choice layer whose choices come from choice_fn(token_T, rng) → (T, K)."""
    rng = np.random.default_rng(seed)
    token_T = rng.integers(VOCAB, size=tokens)
    choice_TK = choice_fn(token_T, rng, k)
    probs_TE = np.full((tokens, EXPERTS), 0.5 / (EXPERTS - 2))
    probs_TE[np.arange(tokens), choice_TK[:, 0]] = 0.3
    probs_TE[np.arange(tokens), choice_TK[:, 1]] = 0.2
    layer = {"choice_TK": choice_TK, "kept_TK": np.ones_like(choice_TK, bool), "probs_TE": probs_TE}
    meta = {"run": "synthetic", "step": step, "routing": "topk", "source": "synthetic", "num_experts": EXPERTS,
            "top_k": k, "domains": ["a", "b"], "eval_capacity_factor": 0.0}  # fmt: skip
    return Recording(token_T, np.arange(tokens) % 100, np.arange(tokens) // 100, token_T % 2, {0: layer}, meta)


def hash_choices(token_T, rng, k):
    """A hash router: the experts are a pure function of the token id."""
    first = (token_T * 7 + 3) % EXPERTS
    return np.stack([first, (first + 1 + token_T % (EXPERTS - 1)) % EXPERTS], 1)


def random_choices(token_T, rng, k):
    """A uniformly random router (k distinct experts per token)."""
    return np.argsort(rng.random((len(token_T), EXPERTS)), 1)[:, :k]


def test_hash_router_is_maximally_concentrated_and_stable():
    rec = synthetic(hash_choices, step=10)
    dec_TE = specialization.token_decisions(rec.layers[0], EXPERTS)
    table = specialization.grouping_table(dec_TE, rec.token_T, np.unique(rec.token_T), min_count=50)
    # every token id sends half its decisions to each of two experts: the largest std two choices allow
    best = np.array([0.5, 0.5] + [0.0] * (EXPERTS - 2)).std()
    np.testing.assert_allclose(table["std"], best)
    assert np.all(table["std"] > 5 * table["uniform_std"])
    later = synthetic(hash_choices, step=20, seed=0)
    rows = early.early_routing([rec, later], 0, min_count=50)
    assert rows[0]["js_to_final"] == pytest.approx(0.0, abs=1e-12) and rows[0]["same_top_expert_as_final"] == 1.0


def test_random_router_matches_the_uniform_reference():
    rec = synthetic(random_choices, step=10, tokens=30000)
    dec_TE = specialization.token_decisions(rec.layers[0], EXPERTS)
    for key_T, tol in ((rec.token_T, 0.05), (rec.position_T, 0.05)):  # 50 and 100 groups
        table = specialization.grouping_table(dec_TE, key_T, np.unique(key_T), k=2)
        assert table["std"].mean() / table["uniform_std"].mean() == pytest.approx(1.0, abs=tol)
    other = synthetic(random_choices, step=20, seed=1, tokens=30000)
    other.token_T = rec.token_T
    assert early.early_routing([rec, other], 0, min_count=50)[0]["same_top_expert_as_final"] < 0.6


def test_repeated_token_drops_exactly_the_positions_past_capacity():
    """One token repeated: every copy picks the same expert, so exactly the latest positions overflow."""
    model_cfg = ModelConfig(d_model=16, num_layers=1, num_heads=2, seq_len=40, vocab_size=VOCAB, ffn_hidden_size=24)
    moe = load_config(None, ["moe.routing=topk", "moe.num_experts=4", "moe.top_k=1", "moe.eval_capacity_factor=1.0",
                             "moe.capacity_factor=1.0", "moe.z_loss_coef=0"]).moe  # fmt: skip
    block = MoEFFN(model_cfg, moe, LayerFactory()).eval()
    init_parameters(block, model_cfg, 0)
    block.record_routing = True
    x_LBD = torch.randn(1, 1, 16).expand(40, 1, 16).contiguous()
    _, out = block(x_LBD)
    kept_T = out.record["kept_LBK"][:, 0, 0].numpy()
    capacity = 40 // 4  # k·cf·T/E tokens per expert
    np.testing.assert_array_equal(kept_T, np.arange(40) < capacity)
    layer = {"kept_TK": out.record["kept_LBK"][:, 0].numpy()}
    rows = drops.drops_by_position(drops.drop_flags(layer), np.arange(40), buckets=4)
    assert [r["dropped_first"] for r in rows] == [0.0, 1.0, 1.0, 1.0]


def test_router_statistics():
    probs_TE = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    assert router_stats.inner_balance(probs_TE) == pytest.approx(np.median([3.5, 2.0]))
    assert router_stats.outer_balance(probs_TE, 2) == pytest.approx(np.mean([0.9, 0.75]))
    uniform = np.full((4, 4), 0.25)
    assert router_stats.gate_entropy(uniform) == pytest.approx(np.log(4))
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(4), size=2000)
    mi = router_stats.cross_layer_mi([a, a, rng.dirichlet(np.ones(4), size=2000)])
    assert mi[0, 1] == pytest.approx(mi[0, 0]) and mi[0, 2] < 0.2 * mi[0, 1]


def test_recording_matches_the_blocks_own_statistics(tiny_data):
    """The recorded kept choices per expert equal the load the blocks report; save/load round trip."""
    cfg = load_config(None, ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.seq_len=32",
                             f"model.vocab_size={tiny_data.vocab_size}", "moe.routing=topk", "moe.num_experts=4",
                             "moe.top_k=2", "moe.eval_capacity_factor=1.0"])  # fmt: skip
    model = build_model(cfg.model, 0, moe=cfg.moe).eval()
    split = tiny_data.split("val")
    batches = [np.array([0, 1, 2]), np.array([3, 4])]
    meta = {"step": 0, "num_experts": 4, "top_k": 2, "routing": "topk"}
    rec = record_routing(model, split, 32, batches, meta)
    assert len(rec.token_T) == 5 * 32
    np.testing.assert_array_equal(rec.token_T[:32], split.batch(np.array([0]), 32).tokens_BL[0].numpy())
    load = {}
    with torch.no_grad():
        for ids in batches:
            batch = split.batch(ids, 32)
            for layer, out in model(batch.tokens_BL, batch.targets_BL).moe.items():
                load[layer] = load.get(layer, 0) + out.stats.load_E.double().numpy()
    for layer, parts in rec.layers.items():
        kept = specialization.token_decisions(parts, 4, after_drop=True).sum(0)
        np.testing.assert_array_equal(kept, load[layer])
        np.testing.assert_allclose(parts["probs_TE"].sum(1), 1.0, rtol=1e-5)


def test_report_files(tmp_path):
    recs = [synthetic(hash_choices, step=s) for s in (10, 20)]
    path = write_report(recs, tmp_path, lambda i: f"t{i}", None, min_count=50)
    text = path.read_text()
    for name in ("specialization_summary", "specialization_domain", "early_routing", "router_stats", "top_tokens"):
        assert f"{name}." in text and any(tmp_path.glob(f"{name}.*"))
    assert "No token was dropped" in text
    with pytest.raises(ValueError, match="--layer 5: not a MoE layer"):
        write_report(recs, tmp_path, str, 5, 50)
    recs[0].save(tmp_path / "r.npz")
    back = Recording.load(tmp_path / "r.npz")
    np.testing.assert_array_equal(back.layers[0]["choice_TK"], recs[0].layers[0]["choice_TK"])
    assert back.meta == recs[0].meta
