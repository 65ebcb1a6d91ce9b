"""data.embedded_unit=definition: modules cut into top-level definitions, and the document statistics."""

from __future__ import annotations

import numpy as np
import pytest

from megamoe.config import load_config
from megamoe.data.definitions import split_definitions
from megamoe.data.doc_stats import document_stats
from megamoe.errors import ConfigError

MODULE = '''"""Module doc."""
import os

@first
@second(1)
def f(x):
    """f doc."""
    return x

X = 1  # kept with the rest

class C(Base):
    def m(self):
        pass

async def g():
    await h()
'''


def test_definitions_with_decorators_docstrings_and_the_rest():
    docs = split_definitions(MODULE)
    assert docs[0].startswith('@first\n@second(1)\ndef f(x):\n    """f doc."""')
    assert docs[1].startswith("class C(Base):") and "def m(self)" in docs[1]
    assert docs[2].startswith("async def g():")
    assert docs[3] == '"""Module doc."""\nimport os\n\n\nX = 1  # kept with the rest\n\n\n'
    assert sorted("".join(docs).splitlines()) == sorted(MODULE.splitlines())  # every line once


def test_unparsable_or_empty_modules():
    assert split_definitions("def broken(:\n    pass\n") == ["def broken(:\n    pass\n"]
    assert split_definitions("\n\n") == []
    assert split_definitions("def only():\n    return 1\n") == ["def only():\n    return 1\n"]


def test_document_stats_by_hand():
    """Documents of 3, 5 and 4 tokens (EOD included): 12 tokens, starts at 3 and 8."""
    stats = document_stats(np.array([0, 3, 8, 12]), 12)
    assert (stats["documents"], stats["mean_tokens"], stats["median_tokens"]) == (3, 4.0, 4.0)
    assert stats["sequences_crossing_a_boundary"] == {}  # no 128-token window in 12 tokens
    offsets = np.array([0, 100, 300, 1000])  # windows of 128 tokens: [0,128] holds the start at 100
    crossing = document_stats(offsets, 1000)["sequences_crossing_a_boundary"]
    assert crossing["128"] == round(2 / 7, 4)  # 7 windows; 0 holds the start at 100, 2 the one at 300
    assert crossing["256"] == round(2 / 3, 4)


def test_embedded_unit_needs_the_embedded_corpus():
    with pytest.raises(ConfigError, match=r"data.embedded_unit: cuts the embedded corpus; data.path is set"):
        load_config(None, ["data.path=docs.jsonl", "data.embedded_unit=definition"])


def test_prepare_by_definition(data_cache):
    """More, shorter documents than whole modules; the default's cache key is unchanged by the new key."""
    from megamoe.data import prepare_data
    from megamoe.data.prepare import key_settings
    from tests.util import tiny_config

    module = tiny_config(data_cache)
    assert "embedded_unit" not in key_settings(module.data)
    by_def = prepare_data(tiny_config(data_cache, None, "data.embedded_unit=definition").data, progress=False)
    base = prepare_data(module.data, progress=False)
    stats, base_stats = by_def.manifest["train_documents"], base.manifest["train_documents"]
    assert by_def.manifest["documents"]["total"] > base.manifest["documents"]["total"]
    assert stats["mean_tokens"] < base_stats["mean_tokens"]
    assert set(stats["sequences_crossing_a_boundary"]) <= {"128", "256", "512", "1024", "4096"}
