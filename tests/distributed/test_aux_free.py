"""aux_free balancing on every layout: the bias after each step equals the single-process run's, bit for bit.

The update b += γ·sign(mean load − load) uses the loads of the whole global batch (all micro-batches,
all DP ranks, every TP slice), so dp2 with and without accumulation, ep2 and tp2 must apply the same
update as one process. The loads are integer counts and the update is a sign, so the check is exact
(no tolerance); the weights are checked as in every layout test (tests/distributed/parity.py).
γ = 0.05 makes the bias move the routing within the 6 steps. A planted bug (each rank updating from
its own loads, without the reduction over ranks) fails the dp2 check.
"""

from __future__ import annotations

import os

import pytest
import torch

from megamoe.model import build_model
from megamoe.model.moe.balance import expert_biases
from megamoe.train.checkpoint import architecture, list_checkpoints, load_checkpoint
from megamoe.train.engine import PlainEngine
from megamoe.train.run import load_run_config
from tests.distributed.test_layouts import assert_layout_matches, launch, launch_layouts
from tests.distributed.test_moe import COMMON, make_reference

AUX_FREE = ["moe.score_fn=sigmoid", "moe.renormalize=true", "moe.balance=aux_free", "moe.bias_update_rate=0.05"]
BIAS_KEYS = tuple(f"moe/L{layer}/bias/e{e}" for layer in (0, 1) for e in range(4))
KEYS = ("train/loss", "train/grad_norm", "eval/loss", "moe/aux_loss", "moe/L1/load_cv", *BIAS_KEYS)
LAYOUTS = {
    "dp2-accumulate": (2, ["parallel.zero_stage=1"]),  # 2 micro-batches of 2 per rank
    "dp2": (2, ["parallel.zero_stage=1", "train.micro_batch_size=4"]),  # one micro-batch of 4 per rank
    "ep2": (2, ["parallel.expert_parallel=2"]),
    "tp2": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=0"]),
}


def biases(run_dir) -> dict[int, dict[str, torch.Tensor]]:
    """The expert biases in every checkpoint of a run, by step."""
    cfg = load_run_config(str(run_dir), [])
    out = {}
    for path in list_checkpoints(run_dir):
        model = build_model(cfg.model, 0, moe=cfg.moe)
        load_checkpoint(path, model, PlainEngine(model, cfg.optim, 1, False), architecture(cfg))
        out[int(path.name.removeprefix("step_"))] = {n: b.clone() for n, b in expert_biases(model).items()}
    return out


def assert_same_biases(run_dir, reference_dir) -> None:
    """Every step's biases equal the single-process run's exactly."""
    got, want = biases(run_dir), biases(reference_dir)
    assert sorted(got) == sorted(want)
    for step, layers in want.items():
        for name, bias in layers.items():
            assert torch.equal(got[step][name], bias), f"step {step} {name}: bias {got[step][name]} != {bias}"


@pytest.fixture(scope="module")
def reference(data_cache, tiny_data, tmp_path_factory):
    """The single-process aux_free run; its biases moved."""
    ref = make_reference(data_cache, tmp_path_factory, "aux_free", [*COMMON, *AUX_FREE], KEYS)
    assert any(b.abs().max() > 0 for layers in biases(ref["run_dir"]).values() for b in layers.values())
    return ref


@pytest.fixture(scope="module")
def runs(data_cache, tiny_data, tmp_path_factory) -> dict:
    """Every layout's run dir, trained in one world."""
    return launch_layouts(LAYOUTS, data_cache, tmp_path_factory.mktemp("aux_free"), *COMMON, *AUX_FREE)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bias_update_is_layout_invariant(name, reference, runs):
    _, overrides = LAYOUTS[name]
    run_dir = runs[name]
    assert_same_biases(run_dir, reference["run_dir"])
    # the eval set is eval_batches micro-batches: another micro-batch size evaluates other sequences
    keys = tuple(k for k in KEYS if k != "eval/loss" or "train.micro_batch_size=4" not in overrides)
    assert_layout_matches(run_dir, reference, keys)


PLANTED = """# A planted bug: each rank moves its bias by its own loads (the reduction over ranks is dropped).
import megamoe.train.moe_metrics as mm
from megamoe.model.moe import RoutingStats

real = mm.MoEMetrics.reduce

def local_reduce(self):
    local = {layer: vec.clone() for layer, vec in self.sums.items()}
    out = real(self)
    skip = len(mm.LOSS_NAMES)
    self.requested = {l: RoutingStats.from_vector(v[skip:], self.cfg.num_experts).requested_E for l, v in local.items()}
    return out

mm.MoEMetrics.reduce = local_reduce
"""


def test_planted_local_loads_fail(reference, data_cache, tmp_path):
    """dp2 with each rank's own loads gives other biases: the exact check catches it."""
    (tmp_path / "plant").mkdir()
    (tmp_path / "plant" / "sitecustomize.py").write_text(PLANTED)
    env = {"PYTHONPATH": f"{tmp_path / 'plant'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    run_dir = tmp_path / "dp2-planted"
    launch(2, data_cache, run_dir, *COMMON, *AUX_FREE, *LAYOUTS["dp2"][1], env=env)
    with pytest.raises(AssertionError, match="bias"):
        assert_same_biases(run_dir, reference["run_dir"])
