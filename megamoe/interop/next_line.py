"""The local lm-eval task `next_line`, built from a run's held-out (validation) documents.

An item is CONTEXT_LINES consecutive lines of a held-out source file (the last one not blank), its
true next line, and DISTRACTORS lines drawn from the other held-out files; the true line's position
among the choices is drawn too. Lines are right-stripped; a choice line has at least MIN_CHARS
visible characters and, with its leading newline, at most seq_len / 2 tokens (so it fits the
context with room for the context). Everything is drawn from one generator seeded by the run's
data seed: the same run always gets the same items. A trained model never saw these documents.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megamoe.config import Config
from megamoe.errors import MegamoeError
from megamoe.utils.fs import atomic_write_text

NAME = "next_line"
CONTEXT_LINES, DISTRACTORS, MIN_CHARS = 4, 3, 8
TEST_ITEMS, FEWSHOT_ITEMS = 150, 10
MAX_DOCUMENTS = 200
"""Held-out documents read at most (a seeded choice): plenty for 160 items, cheap for a large corpus."""
TEMPLATE = Path(__file__).parent / "tasks" / NAME / f"{NAME}_template.yaml"


def held_out_texts(run_dir: Path) -> tuple[list[str], list[int], Config]:
    """(texts, corpus indices) of up to MAX_DOCUMENTS validation documents, and the run's config."""
    from megamoe.data import prepare_data
    from megamoe.data.corpus import load_documents
    from megamoe.train.run import load_run_config

    cfg = load_run_config(str(run_dir), [])
    if cfg.data.blend:
        raise MegamoeError(f"--tasks {NAME}: the run trains on a data.blend; {NAME} reads one source's documents")
    data = prepare_data(cfg.data, progress=False)
    doc_ids = np.sort(data.split("val").doc_ids)
    if len(doc_ids) > MAX_DOCUMENTS:
        doc_ids = np.sort(np.random.default_rng([cfg.data.seed, 17]).choice(doc_ids, MAX_DOCUMENTS, replace=False))
    doc_ids = [int(i) for i in doc_ids]
    docs = load_documents(cfg.data, Path(cfg.data.cache_dir).expanduser() / "hf")
    return [docs[i]["text"] for i in doc_ids], doc_ids, cfg


def make_items(texts: list[str], doc_ids: list[int], encode, max_tokens: int, seed: int, count: int) -> list[dict]:
    """Up to count items (context, choices, label, doc, line) drawn from the texts; encode: str → ids."""
    lines = [[line.rstrip() for line in text.splitlines()] for text in texts]
    usable = [[len(s.strip()) >= MIN_CHARS and len(encode("\n" + s)) <= max_tokens for s in doc] for doc in lines]
    pool = [(d, s) for d, doc in enumerate(lines) for s, line in zip(doc, usable[d]) if line]
    slots = [
        (d, i)
        for d, doc in enumerate(lines)
        for i in range(CONTEXT_LINES, len(doc))
        if usable[d][i] and doc[i - 1].strip()
    ]
    if len(texts) < 2 or not slots:
        raise MegamoeError(
            f"--tasks {NAME}: the run's validation split has {len(texts)} document(s) and {len(slots)} usable "
            "line(s); it needs 2 or more documents (raise data.val_fraction)"
        )
    rng = np.random.default_rng([seed, 16])
    return [_item(lines, pool, slots[k], doc_ids, rng) for k in rng.permutation(len(slots))[:count]]


def _item(lines: list[list[str]], pool: list[tuple[int, str]], slot: tuple[int, int], doc_ids, rng) -> dict:
    """One item: the context before the slot, its true line and distractors from other documents."""
    d, i = slot
    truth, choices = lines[d][i], []
    for _ in range(100 * DISTRACTORS):  # rejection sampling; a tiny pool may leave fewer distractors
        other, line = pool[int(rng.integers(len(pool)))]
        if other != d and line.strip() != truth.strip() and all(line.strip() != c.strip() for c in choices):
            choices.append(line)
        if len(choices) == DISTRACTORS:
            break
    label = int(rng.integers(len(choices) + 1))
    choices.insert(label, truth)
    context = "\n".join(lines[d][i - CONTEXT_LINES : i])
    return {"context": context, "choices": choices, "label": label, "doc": doc_ids[d], "line": i}


def build(run_dir: Path, tokenizer) -> Path:
    """Write RUN_DIR/eval/tasks/next_line/ (items and task YAML); returns the tasks folder above it."""
    texts, doc_ids, cfg = held_out_texts(run_dir)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    items = make_items(texts, doc_ids, encode, cfg.model.seq_len // 2, cfg.data.seed, TEST_ITEMS + FEWSHOT_ITEMS)
    folder = run_dir / "eval" / "tasks" / NAME
    files = {"test": items[FEWSHOT_ITEMS:], "fewshot": items[:FEWSHOT_ITEMS]}
    for split, rows in files.items():
        _write_if_changed(folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    kwargs = {
        "data_files": {s: str((folder / f"{s}.jsonl").resolve()) for s in files},
        "cache_dir": str((Path(cfg.data.cache_dir).expanduser() / "hf").resolve()),
    }
    built = f"\n# built by megamoe from {run_dir.resolve()}\ntask: {NAME}\ndataset_path: json\n"
    _write_if_changed(folder / f"{NAME}.yaml", TEMPLATE.read_text() + built + f"dataset_kwargs: {json.dumps(kwargs)}\n")
    return folder.parent


def _write_if_changed(path: Path, text: str) -> None:
    """Write atomically unless the file already holds text (keeps lm-eval's dataset cache valid)."""
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
