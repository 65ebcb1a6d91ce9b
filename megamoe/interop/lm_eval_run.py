"""`megamoe eval RUN --tasks ...`: lm-evaluation-harness on a run's checkpoint, offline.

Tasks are searched in RUN_DIR/eval/tasks (megamoe's built tasks: next_line), then in each
--include-path folder, and only when some task is in neither, in lm-eval's own task folders
(their datasets must already be in the HF datasets cache: nothing is downloaded). Results land
next to the perplexity reports: RUN_DIR/eval/lm_eval_step_<N>.json (merged with earlier tasks of
the same step), .md, and the per-item responses in lm_eval_step_<N>_samples.jsonl.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from megamoe.errors import MegamoeError
from megamoe.utils.fs import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

BUILT = ("next_line",)
"""megamoe's own tasks, built per run from its held-out documents."""


def require_lm_eval() -> None:
    """lm-eval is importable, or one line saying how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MegamoeError("--tasks needs lm-evaluation-harness: pip install megamoe[eval]") from None


def task_manager(tasks: list[str], folders: list[Path]):
    """A TaskManager that knows every task (lm-eval's own folders only when needed), or an error naming the task."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(f) for f in folders], include_defaults=False)
    if all(t in manager.all_tasks for t in tasks):
        return manager
    manager = TaskManager(include_path=[str(f) for f in folders])
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        where = ", ".join(str(f) for f in folders)
        raise MegamoeError(f"--tasks: unknown task '{missing[0]}' (searched {where} and lm-eval's built-in tasks)")
    return manager


def check_loadable(manager, tasks: list[str]) -> None:
    """Each task's dataset loads offline, or one line naming the task."""
    for name in tasks:
        try:
            manager.load([name])
        except Exception as err:  # any failure here (dataset not cached offline, bad YAML) is the task's
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise MegamoeError(f"--tasks: task '{name}' does not load offline ({first})") from None


def evaluate(run_dir: Path, tasks: list[str], options: dict, checkpoint: Path | None = None) -> dict:
    """Run lm-eval; options: num_fewshot, limit, batch_size, include_paths. Returns the record."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before datasets and huggingface_hub are imported: they read it once
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    require_lm_eval()
    from lm_eval import simple_evaluate

    from megamoe.data.tokenizer import load_tokenizer
    from megamoe.interop.lm_eval_model import MegamoeLM
    from megamoe.train.export import load_run_model
    from megamoe.train.run import TOKENIZER_FILE

    model, meta = load_run_model(run_dir, checkpoint)
    tokenizer = load_tokenizer(run_dir / TOKENIZER_FILE, "tokenizer.json")
    lm = MegamoeLM(model, tokenizer, batch_size=options["batch_size"])
    folders = [*_build_tasks(run_dir, tasks, tokenizer), *options["include_paths"]]
    manager = task_manager(tasks, folders)
    check_loadable(manager, tasks)
    results = simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=options["num_fewshot"], limit=options["limit"],
        task_manager=manager, log_samples=True, bootstrap_iters=1000,
    )  # fmt: skip
    return record(results, {"checkpoint": meta["checkpoint"], "step": meta["step"]}, options)


def _build_tasks(run_dir: Path, tasks: list[str], tokenizer) -> list[Path]:
    """Build megamoe's requested tasks into RUN_DIR/eval/tasks; returns that folder."""
    from megamoe.interop import next_line

    if next_line.NAME in tasks:
        next_line.build(run_dir, tokenizer)
    folder = run_dir / "eval" / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    return [folder]


def record(results: dict, meta: dict, options: dict) -> dict:
    """The JSON record: checkpoint, step, settings, and per task its metrics and sample count."""
    tasks = {}
    for name, metrics in results["results"].items():
        values = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, int | float)}
        n = results.get("n-samples", {}).get(name, {})
        tasks[name] = {
            **values, "samples": n.get("effective"), "num_fewshot": results["n-shot"].get(name),
            "limit": options["limit"],
        }  # fmt: skip
    return {
        **meta, "tasks": tasks, "batch_size": options["batch_size"],
        "lm_eval_version": results.get("lm_eval_version") or _version(),
        "samples": {name: [_sample(s) for s in rows] for name, rows in results.get("samples", {}).items()},
    }  # fmt: skip


def _version() -> str:
    """The installed lm-eval version."""
    from importlib.metadata import version

    return version("lm_eval")


def _sample(sample: dict) -> dict:
    """One logged item: doc id, target, the (filtered) responses and its metrics."""
    keep = {"doc_id": sample["doc_id"], "target": sample["target"], "resps": sample["filtered_resps"]}
    keep.update({k: v for k, v in sample.items() if k in ("acc", "acc_norm", "exact_match")})
    return json.loads(json.dumps(keep, default=str))


def markdown(rec: dict) -> str:
    """One row per task and metric."""
    lines = [f"lm-eval at step {rec['step']} ({rec['checkpoint']})", "", "| task | metric | value | stderr | n |"]
    lines.append("|---|---|---|---|---|")
    for name, metrics in sorted(rec["tasks"].items()):
        for key, value in metrics.items():
            if key.endswith("_stderr") or key in ("samples", "num_fewshot", "limit"):
                continue
            err = metrics.get(f"{key}_stderr")
            err_text = f"{err:.4f}" if isinstance(err, int | float) else "-"
            lines.append(f"| {name} | {key} | {value:.4f} | {err_text} | {metrics['samples']} |")
    return "\n".join(lines)


def write(run_dir: Path, rec: dict) -> Path:
    """Write eval/lm_eval_step_<N>.json, .md and _samples.jsonl; other tasks evaluated at the step are kept."""
    out = run_dir / "eval"
    path = out / f"lm_eval_step_{rec['step']}.json"
    samples_path = out / f"lm_eval_step_{rec['step']}_samples.jsonl"
    samples = rec.pop("samples")
    if path.is_file():
        rec["tasks"] = {**json.loads(path.read_text()).get("tasks", {}), **rec["tasks"]}
    rows = [json.dumps({"task": name, **s}) + "\n" for name, items in samples.items() for s in items]
    if samples_path.is_file():
        kept = samples_path.read_text().splitlines(keepends=True)
        rows = [r for r in kept if json.loads(r)["task"] not in samples] + rows
    atomic_write_json(path, rec)
    atomic_write_text(path.with_suffix(".md"), markdown(rec) + "\n")
    atomic_write_text(samples_path, "".join(rows))
    return path
