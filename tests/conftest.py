"""Fixtures: one tiny prepared data cache per session (the embedded corpus, 60 documents)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
if not os.path.exists("/dev/nvidiactl"):  # no GPU: Triton kernels run in the interpreter (set before any @jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """A data cache folder shared by the whole session (prepared on first use)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tiny_data(data_cache):
    """The prepared tiny embedded corpus."""
    from megamoe.data import prepare_data
    from tests.util import tiny_config

    return prepare_data(tiny_config(data_cache).data, progress=False)
