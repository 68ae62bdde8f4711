"""ModelConfig validation, serialization, presets and analytic parameter counts."""

import json
from pathlib import Path

import msgpack
import pytest

from models import (
    PRESETS,
    ModelConfig,
    build_model,
    count_active_parameters,
    count_parameters,
    get_preset,
)


def test_default_config_is_valid_dense() -> None:
    cfg = ModelConfig()
    assert not cfg.is_moe and cfg.head_dim == 32 and cfg.expert_hidden == cfg.d_ff


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(d_model=130, n_heads=4), "divisible by n_heads"),
        (dict(d_model=12, n_heads=4), "must be even"),
        (dict(n_experts=2, top_k=3), "top_k"),
        (dict(n_layers=0), "n_layers"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(z_loss_coef=-1.0), "z_loss_coef"),
        (dict(n_experts=-1), "n_experts"),
        (dict(tie_embeddings=1), "bool"),
        (dict(d_model=128.0), "int"),
        (dict(n_heads=True), "int"),
    ],
)
def test_invalid_configs_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**overrides)


def test_dict_round_trip_through_json_and_msgpack() -> None:
    cfg = get_preset("moe-nano")
    d = cfg.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert ModelConfig.from_dict(msgpack.unpackb(msgpack.packb(d))) == cfg


def test_from_dict_coerces_int_floats_and_rejects_unknown_keys() -> None:
    cfg = ModelConfig.from_dict({"rope_theta": 10000})
    assert isinstance(cfg.rope_theta, float)
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"d_model": 128, "dropout": 0.1})


def test_get_preset_copies_and_overrides() -> None:
    cfg = get_preset("nano", max_seq_len=64)
    assert cfg.max_seq_len == 64 and PRESETS["nano"].max_seq_len == 256
    cfg.d_model = 7  # mutating the copy must not touch the zoo
    assert PRESETS["nano"].d_model == 128
    with pytest.raises(ValueError, match="valid presets"):
        get_preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        get_preset("nano", n_heads=3)


def test_required_presets_exist() -> None:
    assert {"nano", "tiny", "small", "1b", "moe-nano", "moe-tiny", "moe-small"} <= set(PRESETS)
    assert PRESETS["moe-nano"].n_experts == 8 and PRESETS["moe-nano"].top_k == 2


@pytest.mark.parametrize("name", ["nano", "tiny", "moe-nano"])
@pytest.mark.parametrize("tie", [False, True])
def test_count_parameters_matches_built_module(name: str, tie: bool) -> None:
    cfg = get_preset(name, tie_embeddings=tie)
    model = build_model(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("nano", 0.5e6, 1.5e6),
        ("tiny", 8e6, 14e6),
        ("small", 150e6, 210e6),
        ("1b", 0.9e9, 1.2e9),
        ("moe-small", 400e6, 700e6),
    ],
)
def test_preset_sizes_in_stated_ranges(name: str, low: float, high: float) -> None:
    assert low <= count_parameters(PRESETS[name]) <= high


@pytest.mark.parametrize("dense, moe", [("nano", "moe-nano"), ("tiny", "moe-tiny"), ("small", "moe-small")])
def test_moe_active_parameters_close_to_dense_twin(dense: str, moe: str) -> None:
    dense_count = count_parameters(PRESETS[dense])
    assert count_active_parameters(PRESETS[dense]) == dense_count
    assert abs(count_active_parameters(PRESETS[moe]) / dense_count - 1) < 0.01
    assert count_parameters(PRESETS[moe]) > 2 * dense_count


def test_docs_zoo_table_matches_counts() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (int(cells[7].replace(",", "")), int(cells[8].replace(",", "")))
    assert set(rows) == set(PRESETS)
    for name, cfg in PRESETS.items():
        assert rows[name] == (count_parameters(cfg), count_active_parameters(cfg)), name
