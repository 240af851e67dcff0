"""Typed config loading: keys, types, validation, overrides, hashing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from malloc.configio import (
    ConfigError,
    apply_overrides,
    config_hash,
    from_dict,
    load_yaml,
    to_dict,
)


@dataclass(frozen=True)
class ModelCfg:
    kind: Literal["hstu", "sasrec"] = "hstu"
    layers: int = 2
    dropout: float = 0.1
    causal: bool = True
    heads: Optional[int] = None  # noqa: UP045 (the old spelling must work too)

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.layers}")


@dataclass
class DataCfg:
    name: str
    max_len: int | None = 200
    ks: tuple[int, ...] = (10, 50)
    pair: tuple[int, str] = (1, "a")
    tags: list[str] = field(default_factory=list)
    path: Path | None = None


@dataclass(frozen=True)
class RunCfg:
    data: DataCfg
    model: ModelCfg = field(default_factory=ModelCfg)
    lr: float = 1e-3
    seed: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def test_nested_defaults_and_conversion() -> None:
    cfg = from_dict(RunCfg, {"data": {"name": "ml-1m", "ks": [5, 10]}, "model": {"layers": 4}, "lr": 1})
    assert cfg.data == DataCfg(name="ml-1m", ks=(5, 10))
    assert cfg.model == ModelCfg(layers=4)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert isinstance(cfg.data.ks, tuple)


def test_yaml_1_1_exponent_strings_are_floats() -> None:
    data = yaml.safe_load("lr: 1e-3\ndata: {name: x}")
    assert data["lr"] == "1e-3"  # the YAML 1.1 quirk this guards against
    assert from_dict(RunCfg, data).lr == pytest.approx(1e-3)


def test_unknown_key_is_named_with_dotted_path_and_allowed_keys() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(RunCfg, {"data": {"name": "x"}, "model": {"layerz": 3}})
    message = str(info.value)
    assert "'model.layerz'" in message
    assert "kind, layers, dropout, causal, heads" in message
    assert "did you mean 'layers'" in message


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match=r"missing required key 'data\.name'"):
        from_dict(RunCfg, {"data": {}})


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"model": {"layers": "4"}}, r"model\.layers: expected an int"),
        ({"model": {"layers": 2.0}}, r"model\.layers: expected an int"),
        ({"model": {"layers": True}}, r"model\.layers: expected an int"),
        ({"model": {"causal": 1}}, r"model\.causal: expected true or false"),
        ({"model": {"causal": "yes"}}, r"model\.causal: expected true or false"),
        ({"model": {"dropout": "high"}}, r"model\.dropout: expected a float"),
        ({"model": {"dropout": False}}, r"model\.dropout: expected a float"),
        ({"model": {"kind": "gru"}}, r"model\.kind: expected one of 'hstu', 'sasrec'; got 'gru'"),
        ({"model": {"heads": "two"}}, r"model\.heads: expected an int"),
        ({"model": "big"}, r"model: expected a mapping for ModelCfg"),
        ({"data": {"name": "x", "ks": [1, "b"]}}, r"data\.ks\[1\]: expected an int"),
        ({"data": {"name": "x", "ks": 5}}, r"data\.ks: expected a list"),
        ({"data": {"name": "x", "pair": [1, 2]}}, r"data\.pair\[1\]: expected a string"),
        ({"data": {"name": "x", "pair": [1]}}, r"data\.pair: expected a list of 2 items"),
        ({"data": {"name": 5}}, r"data\.name: expected a string"),
        ({"extra": {"a": "b"}}, r"extra\.a: expected a float"),
        ({"seed": None}, r"seed: null is not allowed|seed: expected an int"),
    ],
)
def test_type_errors_name_the_key(data: dict, pattern: str) -> None:
    data = {"data": {"name": "x"}, **data}
    with pytest.raises(ConfigError, match=pattern):
        from_dict(RunCfg, data)


def test_optional_literal_tuple_list_path() -> None:
    cfg = from_dict(
        RunCfg,
        {
            "data": {"name": "x", "max_len": None, "pair": [3, "b"], "tags": ["a"], "path": "/tmp/d"},
            "model": {"heads": 4, "kind": "sasrec"},
            "extra": {"w": 2},
        },
    )
    assert cfg.data.max_len is None and cfg.data.pair == (3, "b") and cfg.data.tags == ["a"]
    assert cfg.data.path == Path("/tmp/d")
    assert cfg.model.heads == 4 and cfg.model.kind == "sasrec"
    assert cfg.extra == {"w": 2.0}


def test_post_init_value_error_becomes_config_error_with_path() -> None:
    with pytest.raises(ConfigError, match=r"^model: layers must be >= 1, got 0$") as info:
        from_dict(RunCfg, {"data": {"name": "x"}, "model": {"layers": 0}})
    assert isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ConfigError, match=r"^ModelCfg: layers must be >= 1"):
        from_dict(ModelCfg, {"layers": -1})


def test_literal_is_type_strict() -> None:
    @dataclass
    class Bits:
        bits: Literal[2, 4, 8] = 4

    assert from_dict(Bits, {"bits": 8}).bits == 8
    with pytest.raises(ConfigError, match="expected one of 2, 4, 8"):
        from_dict(Bits, {"bits": 8.0})


def test_non_mapping_and_non_dataclass() -> None:
    with pytest.raises(ConfigError, match="config: expected a mapping"):
        from_dict(ModelCfg, [1, 2])  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        from_dict(dict, {})  # type: ignore[type-var]


def test_to_dict_round_trips_through_yaml() -> None:
    cfg = from_dict(RunCfg, {"data": {"name": "x", "path": "p", "ks": [1]}, "extra": {"a": 1.5}})
    plain = to_dict(cfg)
    assert plain["data"]["ks"] == [1] and plain["data"]["path"] == "p"
    assert from_dict(RunCfg, yaml.safe_load(yaml.safe_dump(plain))) == cfg


def test_to_dict_skips_init_false_fields() -> None:
    @dataclass
    class Derived:
        width: int = 4
        double: int = field(init=False)

        def __post_init__(self) -> None:
            self.double = 2 * self.width

    assert to_dict(Derived(3)) == {"width": 3}
    assert from_dict(Derived, to_dict(Derived(3))).double == 6


def test_load_yaml(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("model:\n  layers: 3  # comment\n")
    assert load_yaml(good) == {"model": {"layers": 3}}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


def test_load_yaml_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found: .*missing\.yaml"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"invalid YAML in .*bad\.yaml"):
        load_yaml(bad)
    top_list = tmp_path / "list.yaml"
    top_list.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping"):
        load_yaml(top_list)


def test_apply_overrides_parses_values_and_creates_keys() -> None:
    base = {"model": {"layers": 2}, "data": {"name": "x"}}
    result = apply_overrides(
        base,
        [
            "model.layers=4",
            "model.kind=sasrec",
            "data.ks=[5, 10]",
            "model.heads=null",
            "new.deep.key=1.5",
            "data.name=a=b",
        ],
    )
    assert result["model"] == {"layers": 4, "kind": "sasrec", "heads": None}
    assert result["data"] == {"name": "a=b", "ks": [5, 10]}
    assert result["new"] == {"deep": {"key": 1.5}}
    assert base == {"model": {"layers": 2}, "data": {"name": "x"}}  # the input is not modified


def test_override_then_from_dict_names_unknown_key() -> None:
    data = apply_overrides({"data": {"name": "x"}}, ["model.layres=4"])
    with pytest.raises(ConfigError, match=r"unknown key 'model\.layres'"):
        from_dict(RunCfg, data)


@pytest.mark.parametrize("override", ["model.layers", "=4", "model..layers=4", "model.=4", ".a=1"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="malformed override"):
        apply_overrides({}, [override])


def test_override_into_scalar_and_bad_value() -> None:
    with pytest.raises(ConfigError, match=r"'model\.layers' holds 2"):
        apply_overrides({"model": {"layers": 2}}, ["model.layers.x=1"])
    with pytest.raises(ConfigError, match="invalid YAML in override"):
        apply_overrides({}, ["a=[1, 2"])


def test_config_hash_stable_and_sensitive() -> None:
    cfg = from_dict(RunCfg, {"data": {"name": "x"}})
    same = from_dict(RunCfg, {"model": {}, "data": {"name": "x"}, "seed": 0})
    assert config_hash(cfg) == config_hash(same)
    assert len(config_hash(cfg)) == 8 and int(config_hash(cfg), 16) >= 0
    assert config_hash(cfg) != config_hash(from_dict(RunCfg, {"data": {"name": "x"}, "seed": 1}))
    assert config_hash(cfg) != config_hash(from_dict(RunCfg, {"data": {"name": "x"}, "model": {"layers": 3}}))
    # Key order does not matter for mappings.
    assert config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == config_hash({"b": {"d": 3, "c": 2}, "a": 1})
    # Pinned value: the hash must not drift between versions, or every stored result would be orphaned.
    assert config_hash({"a": 1}) == "015abd7f"  # sha256('{"a":1}')[:8]
