"""Sweep files: a base config, named variants, a grid and zipped lists of overrides, seeds and budgets → runs.

A sweep YAML holds:
  name: study                  # folder under `out`
  out: runs/sweeps             # default; relative to the working directory
  config: ../debug/cpu_tiny.yaml   # base config (relative to the sweep file); optional
  overrides: [train.max_steps=200]  # applied to every run
  variants:                    # optional; each a list of overrides, or {config: FILE, overrides: [...]}
    dense: []
    top2: {config: ../debug/moe_top2.yaml}
  grid: {moe.num_experts: [4, 8]}        # cartesian product
  zip: {optim.lr: [1e-3, 3e-3], optim.warmup_steps: [10, 20]}   # taken together, position by position
  seeds: [1, 2, 3]             # train.seed of each run (default [train.seed of the config])
  budgets: [500, 1000, 2000]   # optional: train.max_steps of each run; WSD cooldown branches (budgets.py)
  largest_budget_seeds: [4]    # optional, with budgets: more seeds, each a trunk alone (the largest budget)
  reports: [balance, {crossover: {baseline: dense}}]   # optional: study reports --collect adds (reports/)
  archive: ../../docs/records/study   # optional: finished jobs' records, checkpoints left out (archive.py)
Every run is named after what it varies: `<variant>-<key>=<value>…-seed<s>` (keys by their last
component; no seed suffix without `seeds`; `-steps<S>` appended with `budgets`), and every run's
config is built and validated when the sweep is read.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from megamoe.config import Config, load_config
from megamoe.errors import ConfigError
from megamoe.sweep.budgets import budget_problem, parse_budgets, parse_largest_only
from megamoe.sweep.reports import REPORTS

SWEEP_KEYS = {
    "name", "out", "config", "overrides", "variants", "grid", "zip", "seeds", "budgets", "largest_budget_seeds",
    "reports", "archive",
}  # fmt: skip


@dataclass(frozen=True)
class Branch:
    """Where a cooldown branch starts: its trunk run and the trunk's checkpoint step."""

    trunk: str
    trunk_dir: Path
    step: int


@dataclass(frozen=True)
class Run:
    """One run of a sweep."""

    name: str
    variant: str
    config: str | None
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path
    cfg: Config
    group: str = ""
    """The runs that differ only in seed share it ('' = the name up to `-seed`)."""
    branch: Branch | None = None
    """A budget sweep's cooldown branch: it starts from its trunk's checkpoint."""

    @property
    def args(self) -> list[str]:
        """`megamoe train` arguments for a fresh start."""
        return [*([self.config] if self.config else []), *self.overrides]


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file."""

    name: str
    path: Path
    root: Path
    runs: tuple[Run, ...]
    reports: tuple[tuple[str, dict], ...] = ()
    """Study reports --collect adds, with their options (megamoe/sweep/reports/)."""
    archive: Path | None = None
    """Where finished jobs' records are kept without their checkpoints (archive.py); None: nowhere."""

    @property
    def jobs(self) -> list[tuple[Run, ...]]:
        """The runs in the order they must run: each trunk with its branches after it, every other run alone."""
        jobs: dict[str, list[Run]] = {}
        for run in self.runs:
            jobs.setdefault(run.branch.trunk if run.branch else run.name, []).append(run)
        return [tuple(job) for job in jobs.values()]


def _err(path: Path, key: str, what: str) -> ConfigError:
    return ConfigError(f"{path}: {key}", what)


def _resolve(path: Path, config: str | None) -> str | None:
    """A config path relative to the sweep file."""
    return None if config is None else str((path.parent / config).resolve())


def _variants(path: Path, spec: dict, base: str | None) -> dict[str, tuple[str | None, list[str]]]:
    """name → (config file, overrides)."""
    raw = spec.get("variants") or {"base": []}
    if not isinstance(raw, dict):
        raise _err(path, "variants", "must map variant names to override lists or {config, overrides}")
    out = {}
    for name, body in raw.items():
        if isinstance(body, list):
            out[str(name)] = (base, [str(o) for o in body])
        elif isinstance(body, dict) and set(body) <= {"config", "overrides"}:
            out[str(name)] = (_resolve(path, body.get("config")) or base, [str(o) for o in body.get("overrides", [])])
        else:
            raise _err(path, f"variants.{name}", "must be a list of key=value overrides or {config:, overrides:}")
    return out


def _axes(path: Path, spec: dict) -> list[list[tuple[str, object]]]:
    """Every combination of the grid (cartesian) and the zipped lists, as [(key, value), ...]."""
    grid, zipped = spec.get("grid") or {}, spec.get("zip") or {}
    for field, table in (("grid", grid), ("zip", zipped)):
        if not isinstance(table, dict) or any(not isinstance(v, list) or not v for v in table.values()):
            raise _err(path, field, "must map config keys to non-empty lists of values")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise _err(path, "zip", f"every list must have the same length, got {sorted(lengths)}")
    zip_rows = [list(zip(zipped, vals, strict=True)) for vals in zip(*zipped.values(), strict=True)] or [[]]
    grid_rows = [list(zip(grid, vals, strict=True)) for vals in itertools.product(*grid.values())] or [[]]
    return [g + z for g in grid_rows for z in zip_rows]


def _config(path: Path, run_name: str, config: str | None, overrides: list[str]) -> Config:
    """One run's config; an error names the sweep file and the run."""
    try:
        return load_config(config, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {run_name}: {err.key}", err.message) from None


def _label(items: list[tuple[str, object]]) -> str:
    return "".join(f"-{key.rsplit('.', 1)[-1]}={value}" for key, value in items)


@dataclass(frozen=True)
class _Point:
    """One (variant, grid point, seed) of a sweep: what its run (or its budget runs) share."""

    path: Path
    root: Path
    variant: str
    config: str | None
    name: str
    group: str
    overrides: tuple[str, ...]

    def run(self, name: str, group: str, extra: list[str]) -> Run:
        """A run of this point, its config built and validated."""
        run_dir = self.root / name
        overrides = (*self.overrides, *extra, f"train.name={name}", f"train.run_dir={run_dir}")
        cfg = _config(self.path, name, self.config, list(overrides))
        return Run(name, self.variant, self.config, overrides, cfg.train.seed, run_dir, cfg, group)


def _budget_runs(point: _Point, budgets: tuple[int, ...], with_branches: bool = True) -> list[Run]:
    """The trunk (the largest budget, keeping every branch point), then one cooldown branch per smaller budget.

    with_branches=False: the trunk alone (a seed of largest_budget_seeds), with no branch points to keep.
    """
    *smaller, largest = budgets if with_branches else budgets[-1:]
    trunk = f"{point.name}-steps{largest}"
    branches = []
    for steps in smaller:
        run = point.run(f"{point.name}-steps{steps}", f"{point.group}-steps{steps}", [f"train.max_steps={steps}"])
        start = Branch(trunk, point.root / trunk, run.cfg.optim.decay_start(steps))
        branches.append(dataclasses.replace(run, branch=start))
    given = branches[0].cfg.train.checkpoint_steps if branches else []  # the file's own, kept too
    pins = sorted({b.branch.step for b in branches} | set(given))
    keep = [f"train.checkpoint_steps=[{','.join(map(str, pins))}]"] if pins else []
    runs = [point.run(trunk, f"{point.group}-steps{largest}", [f"train.max_steps={largest}", *keep]), *branches]
    for run in runs:
        if why := budget_problem(run.cfg, budgets):
            raise _err(point.path, "budgets", f"run {run.name}: {why}")
    return runs


def load_sweep(path: Path) -> Sweep:
    """Parse, expand and validate a sweep file."""
    if not path.is_file():
        raise ConfigError("SWEEP", f"no sweep file {path}")
    spec = yaml.safe_load(path.read_text()) or {}
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise _err(path, sorted(unknown)[0], f"unknown sweep key; expected one of {sorted(SWEEP_KEYS)}")
    name = str(spec.get("name") or path.stem)
    root = Path(spec.get("out", "runs/sweeps")) / name
    base = _resolve(path, spec.get("config"))
    common = [str(o) for o in spec.get("overrides", [])]
    budgets = parse_budgets(path, spec)
    seeds = [(seed, True) for seed in spec.get("seeds") or [None]]
    seeds += [(seed, False) for seed in parse_largest_only(path, spec, budgets)]
    runs, variants, axes = [], _variants(path, spec, base), _axes(path, spec)
    # Seed-major: an interrupted sweep has compared every variant on its first seed before any second seed.
    for seed, every_budget in seeds:
        for variant, (config, extra) in variants.items():
            for items in axes:
                axis = [f"{k}={v}" for k, v in items]
                group = f"{variant}{_label(items)}"
                run_name = group + (f"-seed{seed}" if seed is not None else "")
                seeded = [f"train.seed={seed}"] if seed is not None else []
                point = _Point(path, root, variant, config, run_name, group, (*common, *extra, *axis, *seeded))
                runs += _budget_runs(point, budgets, every_budget) if budgets else [point.run(run_name, group, [])]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise _err(path, "variants", "two runs would share a name; give variants distinct names")
    archive = spec.get("archive")
    if archive is not None and not (isinstance(archive, str) and archive):
        raise _err(path, "archive", f"must be a folder path (relative to the sweep file), got {archive!r}")
    archive_dir = Path(_resolve(path, archive)) if archive else None
    return Sweep(name, path, root, tuple(runs), _reports(path, spec, list(variants)), archive_dir)


def _reports(path: Path, spec: dict, variants: list[str]) -> tuple[tuple[str, dict], ...]:
    """The sweep's `reports`: each a report name, or {name: {option: value}}, checked against its function."""
    entries = spec.get("reports") or []
    if not isinstance(entries, list):
        raise _err(path, "reports", f"expected a list of report names from {sorted(REPORTS)}, got {entries!r}")
    out = []
    for entry in entries:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1 else (entry, {})
        if not isinstance(name, str) or name not in REPORTS or not isinstance(options, dict):
            raise _err(
                path,
                "reports",
                f"expected a report name from {sorted(REPORTS)} or {{name: {{options}}}}, got {entry!r}",
            )
        known = list(REPORTS[name][1])
        if unknown := sorted(set(options) - set(known)):
            raise _err(path, "reports", f"{name}: unknown option {unknown[0]!r}; expected one of {known}")
        _check_variant_options(path, name, options, variants)
        out.append((name, dict(options)))
    return tuple(out)


def _check_variant_options(path: Path, report: str, options: dict, variants: list[str]) -> None:
    """Report options naming variants (baseline: one, pairs: [[a, b], ...], analyze: [...]) name this sweep's."""
    pairs, analyze = options.get("pairs") or [], options.get("analyze") or []
    if not isinstance(pairs, list) or not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
        raise _err(path, "reports", f"{report}.pairs: expected a list of [a, b] pairs of variant names, got {pairs!r}")
    if not isinstance(analyze, list):
        raise _err(path, "reports", f"{report}.analyze: expected a list of variant names, got {analyze!r}")
    named = [("baseline", options["baseline"])] if "baseline" in options else []
    named += [("pairs", v) for pair in pairs for v in pair] + [("analyze", v) for v in analyze]
    for key, variant in named:
        if variant not in variants:
            raise _err(
                path,
                "reports",
                f"{report}.{key}: {variant!r} is not a variant of this sweep; expected one of {variants}",
            )
