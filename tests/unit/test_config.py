"""Config: defaults, YAML inheritance, overrides, type checks, errors, docs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megamoe.config import Config, build_config, config_to_dict, load_config, save_config
from megamoe.config.docs import iter_keys, keys_markdown
from megamoe.config.resolve import with_vocab
from megamoe.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> Path:
    """Write a YAML file and return its path."""
    path.write_text(text)
    return path


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.d_model == 256 and cfg.moe.routing == "none"
    assert cfg.model.kv_heads == cfg.model.num_heads
    assert cfg.model.ffn_hidden == 704  # 8/3·256 = 682.7 → next multiple of 64


def test_base_chain_and_precedence(tmp_path):
    write(tmp_path / "root.yaml", "model:\n  d_model: 128\n  num_layers: 3\noptim:\n  lr: 1e-3\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\nmodel:\n  num_layers: 5\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\ntrain:\n  max_steps: 7\n")
    cfg = load_config(leaf, ["model.num_layers=9"])
    assert cfg.model.d_model == 128  # from the root
    assert cfg.model.num_layers == 9  # override beats mid beats root
    assert cfg.optim.lr == pytest.approx(1e-3)  # YAML's '1e-3' string becomes a float
    assert cfg.train.max_steps == 7
    assert cfg.train.name == "leaf"


def test_list_of_bases_later_wins(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  d_model: 64\n  num_layers: 2\n")
    write(tmp_path / "b.yaml", "model:\n  num_layers: 6\n")
    leaf = write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\n")
    cfg = load_config(leaf)
    assert (cfg.model.d_model, cfg.model.num_layers) == (64, 6)


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular base chain"):
        load_config(tmp_path / "a.yaml")


def test_override_types():
    cfg = load_config(None, ["optim.lr=5e-4", "model.tie_embeddings=true", "data.exclude_domains=[test, idlelib]"])
    assert cfg.optim.lr == 5e-4 and cfg.model.tie_embeddings is True
    assert cfg.data.exclude_domains == ["test", "idlelib"]
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # ints widen to float


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.d_model=abc", "model.d_model: expected int, got 'abc'"),
        ("model.d_model=2.5", "model.d_model: expected int"),
        ("model.tie_embeddings=1", "model.tie_embeddings: expected bool"),
        ("train.precision=fp16", "train.precision: expected one of 'auto', 'fp32', 'bf16'"),
        ("data.exclude_domains=test", "data.exclude_domains: expected a list"),
        ("model.d_model", "an override must look like section.key=value"),
    ],
)
def test_override_type_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [("model.d_modle", "model.d_model"), ("train.lr", "optim.lr"), ("logging.wandb.mdoe", "logging.wandb.mode")],
)
def test_unknown_key_suggests(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown config key .*did you mean '{suggestion}'"):
        load_config(None, [f"{key}=1"])


def test_unknown_key_names_its_file(tmp_path):
    path = write(tmp_path / "x.yaml", "model:\n  num_layer: 3\n")
    with pytest.raises(
        ConfigError,
        match=rf"model.num_layer: unknown config key \(in {tmp_path}/x.yaml\); did you mean 'model.num_layers'",
    ):
        load_config(path)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  d_model: 64\n   num_layers: [2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: malformed YAML"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml not found"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
        ("model.num_heads=3", r"model.num_heads: must divide model.d_model \(256\), got 3"),
        ("model.num_kv_heads=3", r"model.num_kv_heads: must divide model.num_heads"),
        ("train.global_batch_size=10", r"train.global_batch_size: must be a multiple of train.micro_batch_size"),
        ("data.val_fraction=1.5", r"data.val_fraction: must be in \(0, 1\)"),
        ("optim.beta2=1.0", r"optim.beta2: must be in \[0, 1\)"),
        ("logging.wandb.project=", "logging.wandb.project: must not be empty"),
        ("optim.warmup_steps=400", r"optim.warmup_steps: must be < train.max_steps"),
    ],
)
def test_invariants(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.d_model=64", "data.exclude_domains=[test]", "optim.lr=2e-4", "train.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(cfg)


def test_vocab_resolution():
    cfg = load_config()
    assert with_vocab(cfg, 4000, "tok").model.vocab_size == 4032  # padded to a multiple of 64
    assert cfg.model.vocab_size == 0  # the input is not modified
    fixed = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=256))
    with pytest.raises(ConfigError, match=r"model.vocab_size: 256 is smaller than the tokenizer's vocabulary \(512"):
        with_vocab(fixed, 512, "tok.json")


def test_every_field_has_a_docstring():
    missing = [info.key for info in iter_keys(Config) if not info.doc]
    assert not missing, f"config fields without a one-line docstring: {missing}"
    multi = [info.key for info in iter_keys(Config) if "\n" in info.doc]
    assert not multi, f"docstrings longer than one line: {multi}"


def test_docs_config_md_is_current():
    text = (REPO / "docs" / "config.md").read_text()
    assert keys_markdown(Config) in text, "docs/config.md is stale: regenerate with `megamoe config --keys`"


def test_build_config_rejects_unknown_flat_key():
    with pytest.raises(ConfigError, match="unknown config key"):
        build_config({"model.width": 3})
