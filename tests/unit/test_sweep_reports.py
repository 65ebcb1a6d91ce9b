"""The sweep study reports' arithmetic: verdicts, FLOPs interpolation, crossovers, pairs, domain specialization."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from megamoe.sweep.reports import REPORTS, report_function
from megamoe.sweep.reports.crossover import (
    at_flops,
    crossover_lines,
    delta_series,
    equal_flops_delta,
    pair_table,
    plot,
    verdict,
)
from megamoe.sweep.reports.lory_domains import domain_specialization, js_divergence


def point(seed: int, loss: float, tokens: int, flops: float) -> dict:
    """One finished run's row as the crossover report sees it."""
    return {"run": f"r{seed}", "seed": seed, "eval_loss": loss, "tokens": tokens, "flops": flops}


def test_verdict_needs_two_standard_errors():
    # means 1.0 and 2.0; sample stds √0.02 over 2 seeds: SE = √(0.02/2 + 0.02/2) = √0.02; Δ = −1 → ahead
    diff, se, word = verdict([0.9, 1.1], [1.9, 2.1])
    assert diff == pytest.approx(-1.0) and se == pytest.approx(math.sqrt(0.02)) and word == "ahead"
    assert verdict([1.9, 2.1], [0.9, 1.1])[2] == "behind"
    # Δ = 0.15 with SE √0.02 ≈ 0.141: 1.06 SE, within noise
    assert verdict([1.05, 1.25], [0.9, 1.1])[2] == "within noise"
    assert verdict([1.0], [2.0, 2.1])[2] == "one seed"


def test_at_flops_interpolates_in_log_flops_and_refuses_to_extrapolate():
    base = {100: [point(1, 3.0, 100, 1e12)], 1000: [point(1, 2.0, 1000, 1e14)]}
    assert at_flops(base, 1e13) == pytest.approx(2.5)  # halfway in log10: 12 → 14
    assert at_flops(base, 1e14) == pytest.approx(2.0)
    assert math.isnan(at_flops(base, 1e15)) and math.isnan(at_flops(base, 1e11))
    assert at_flops(base, 1.005e14) == pytest.approx(2.0)  # a router's extra FLOPs: within FLOPS_SLACK (1%)
    assert math.isnan(at_flops(base, 1.02e14))


def test_equal_flops_delta_interpolates_the_other_curve_where_the_baselines_ends():
    base = {100: [point(1, 3.0, 100, 1e12)], 1000: [point(1, 2.0, 1000, 1e14)]}
    moe = {100: [point(1, 2.9, 100, 1.1e12)], 1000: [point(1, 1.9, 1000, 1.2e14)]}  # 10% and 20% more FLOPs
    data = {"dense": base, "moe": moe, "one": {1000: [point(1, 1.9, 1000, 1.2e14)]}}
    inside = 2.9 - (3.0 - math.log(1.1) / math.log(100))  # dense's curve at the MoE's 1.1e12 FLOPs
    assert equal_flops_delta(data, "moe", "dense", 100) == f"{inside:+.3f}"
    frac = math.log(1e14 / 1.1e12) / math.log(1.2e14 / 1.1e12)  # the MoE's curve at dense's 1e14 FLOPs
    assert equal_flops_delta(data, "moe", "dense", 1000) == f"{2.9 - frac - 2.0:+.3f} †"
    assert equal_flops_delta(data, "one", "dense", 1000) == "—"  # one budget: nothing to interpolate


def test_crossover_is_the_smallest_budget_from_which_the_variant_stays_ahead():
    def pts(losses: list[float], tokens: int) -> list[dict]:
        return [point(s, loss, tokens, 1.0) for s, loss in enumerate(losses, 1)]

    data = {
        "dense": {1: pts([3.0, 3.02], 10), 2: pts([2.5, 2.52], 20), 3: pts([2.0, 2.02], 30)},
        "moe": {1: pts([2.0, 2.02], 10), 2: pts([2.6, 2.62], 20), 3: pts([1.5, 1.52], 30)},  # ahead, behind, ahead
        "flat": {1: pts([3.0, 3.02], 10), 3: pts([2.0, 2.02], 30)},
    }
    data["single"] = {3: [point(1, 1.0, 30, 1.0)]}
    moe, flat, single = crossover_lines(data, "dense")
    assert moe == (
        "- **moe**: ahead from 30 tokens (3 steps) on; 10 tokens -1.000 (ahead), 20 tokens +0.100 (behind), "
        "30 tokens -0.500 (ahead)."
    )
    noise = "10 tokens +0.000 (within noise), 30 tokens +0.000 (within noise)"
    assert flat == f"- **flat**: not ahead through the largest budget; {noise}."
    assert single == "- **single**: no verdict while a budget has one seed; 30 tokens -1.010 (one seed)."


def test_delta_series_is_the_difference_of_means_at_the_shared_budgets(tmp_path):
    """The plot's Δ panel: per shared budget, mean − baseline mean and verdict's SE (nan with one seed)."""
    data = {
        "dense": {1: [point(1, 3.0, 10, 1.0), point(2, 3.2, 10, 1.0)], 2: [point(1, 2.0, 20, 2.0)]},
        "moe": {1: [point(1, 2.9, 10, 1.0), point(2, 2.9, 10, 1.0)], 2: [point(1, 2.5, 20, 2.0)]},
    }
    data["moe"][3] = [point(1, 1.0, 30, 3.0)]  # a budget dense lacks
    ((tokens1, diff1, se1), (tokens2, diff2, se2)) = delta_series(data, "dense")["moe"]
    # budget 1: means 2.9 and 3.1; SE = √(0/2 + 0.02/2) = 0.1; budget 2: one seed each; budget 3: no dense
    assert (tokens1, tokens2) == (10, 20) and diff1 == pytest.approx(-0.2) and se1 == pytest.approx(0.1)
    assert diff2 == pytest.approx(0.5) and math.isnan(se2)
    assert list(delta_series(data, "dense")) == ["moe"]
    plot(data, tmp_path / "c.png", "dense")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_pairs_subtract_seed_by_seed_at_every_shared_budget():
    data = {
        "a": {1: [point(1, 9.0, 10, 1)], 5: [point(1, 2.0, 50, 1), point(2, 2.5, 50, 1), point(3, 2.0, 50, 1)]},
        "b": {1: [point(1, 0.0, 10, 1)], 5: [point(2, 2.0, 50, 1), point(1, 2.25, 50, 1)], 7: [point(1, 1.0, 70, 1)]},
        "c": {1: [point(2, 1.0, 10, 1)]},
    }
    header, rule, one, five, none = pair_table(data, [["a", "b"], ["a", "c"]])
    assert header.startswith("| a − b | steps | tokens | seeds |") and rule.startswith("|---|")
    assert one == "| a − b | 1 | 10 | 1 | +9.000 | +9.000 | 0.000 | — |"
    # seeds 1 and 2 only (b lacks seed 3): −0.25 and +0.5; mean 0.125, sample std 0.75/√2, SE 0.75/2
    assert five == f"| a − b | 5 | 50 | 1, 2 | -0.250, +0.500 | +0.125 | {0.75 / math.sqrt(2):.3f} | {0.375:.3f} |"
    assert none == "| a − c | — | — | — | no seed finished for both yet | | | |"


def test_js_divergence_bounds():
    q_E = np.array([0.5, 0.5, 0.0])
    assert js_divergence(np.array([[0.5, 0.5, 0.0]]), q_E) == pytest.approx([0.0])
    assert js_divergence(np.array([[0.0, 0.0, 1.0]]), q_E) == pytest.approx([math.log(2)])


def test_domain_specialization_zero_when_alike_and_known_when_split():
    rng = np.random.default_rng(0)
    same_TE = np.tile(rng.dirichlet(np.ones(4)), (60, 1))
    domain_T = np.repeat([0, 1, 2], 20)
    assert domain_specialization(same_TE, domain_T) == pytest.approx(0.0, abs=1e-12)
    # two equal-sized domains on disjoint experts: overall mean q = (½, ½), a domain p = (1, 0), m = (¾, ¼):
    # JS = ½[KL(p‖m) + KL(q‖m)] = ½[ln 4/3 + ½ ln 2/3 + ½ ln 2] = ¾ ln 4/3
    split_TE = np.repeat([[1.0, 0.0], [0.0, 1.0]], 10, axis=0)
    assert domain_specialization(split_TE, np.repeat([0, 1], 10)) == pytest.approx(0.75 * math.log(4 / 3))


def test_registry_options_are_the_report_functions_keywords():
    """spec.py checks a sweep file's options against REPORTS without importing the report modules."""
    for name, (_, options) in REPORTS.items():
        params = list(inspect.signature(report_function(name)).parameters)
        assert params[:3] == ["sweep", "rows", "out_dir"] and tuple(params[3:]) == options, name
