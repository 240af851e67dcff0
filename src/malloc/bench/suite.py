"""Benchmark suites: backbones x tasks x data sets x schemes x memory ratios x seeds, run as one resumable job.

A suite is a YAML file under ``configs/suites/`` (``malloc bench --suite NAME``), loaded into :class:`SuiteSpec`
(unknown keys are errors naming the key). Each combination of data set, backbone, task and seed is a *setting*
(one :class:`~malloc.config.RunConfig`: the suite's ``base`` config, then the backbone's, the task's and the data
set's partial configs, deep-merged in that order). A setting expands into items:

- ``native``: train Native (:func:`malloc.runner.run`), the reference every other item of the setting is compared to;
- ``policy`` (training-free scheme x ratio): serve the Native checkpoint under the policy
  (:func:`malloc.eval.evaluate.evaluate_scheme`); Native is trained first if it is missing;
- ``trained`` (trained-in scheme): train with ``model.scheme/memory_ratio``. Ratios that resolve to the same
  model (same knobs in force and the same stored bytes; e.g. MQA, Reformer and RWKV at every ratio, or GQA with
  4 heads at 1/4 and 1/16) are trained once, and the item stands for all of them.

Running the items is :mod:`malloc.bench.sweep`.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from malloc.bench.meters import LatencySpec
from malloc.config import RunConfig
from malloc.configio import ConfigError, config_hash, from_dict, load_yaml, to_dict
from malloc.data.fingerprint import input_files
from malloc.data.sequences import DataError
from malloc.memory.policy import SchemeError
from malloc.memory.registry import build_architecture
from malloc.memory.schemes import ARCHITECTURES, POLICIES

SUITES_DIR = Path("configs") / "suites"
REFERENCE, TRAINING_FREE, TRAINED_IN = "reference", "training-free", "trained-in"
SCHEME_GROUPS = ("all", TRAINING_FREE, TRAINED_IN)
# history lengths at which two ratios of a trained-in scheme must store the same bytes to share one training
_PROBE_LENGTHS = (64, 1024, 16384)


@dataclass(frozen=True)
class DatasetSpec:
    """One data set of a suite.

    Attributes:
        config: partial run config merged into every run on this data set (at least ``data.source``).
        needs_path: the data set is skipped unless a path is given (``malloc bench --data NAME=PATH``, or
            ``data.path`` in ``config``).
    """

    config: dict[str, Any] = field(default_factory=dict)
    needs_path: bool = False


@dataclass(frozen=True)
class VariantSpec:
    """A scheme at knobs of its own, under its own label (wrappers need one: ``pyramid`` names an inner scheme).

    Attributes:
        scheme: a registered scheme or wrapper name (``malloc methods``).
        knobs: its knobs, as ``malloc eval --knob`` takes them.
    """

    scheme: str
    knobs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteSpec:
    """A suite file (``configs/suites/*.yaml``).

    Attributes:
        name: the suite's name; results go to ``<results>/<name>/``.
        description: one line for reports.
        base: partial run config for every run (keys as in ``configs/bench/*.yaml``; state the training budget
            here, e.g. ``train: {epochs: 3}``).
        backbones, tasks: label -> partial run config; a backbone label defaults ``model.backbone`` to itself and
            a task label ``task`` to itself, so ``{hstu: {}}`` is enough.
        datasets: label -> :class:`DatasetSpec`.
        schemes: registered scheme names, or ``all`` / ``training-free`` / ``trained-in`` for every registered
            scheme of that family (wrappers are never implied: name them in ``variants``).
        exclude: scheme names to leave out of what ``schemes`` selects.
        variants: label -> :class:`VariantSpec`, further arms with knobs of their own.
        ratios: target memory ratios, numbers or fractions (``1/4``), in (0, 1).
        trained_ratios: the ratios of the trained-in arms, where they differ from ``ratios`` (each distinct model
            a trained-in scheme builds is a training run, so a suite may give them fewer); empty = ``ratios``.
        seeds: training seeds (``train.seed``); with several, reports give mean and standard deviation.
        latency: per-request latency settings (:class:`~malloc.bench.meters.LatencySpec`).
    """

    name: str
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    backbones: dict[str, dict[str, Any]] = field(default_factory=lambda: {"hstu": {}})
    tasks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"ctr": {}})
    datasets: dict[str, DatasetSpec] = field(
        default_factory=lambda: {"ml100k": DatasetSpec({"data": {"source": "ml-100k"}})})
    schemes: tuple[str, ...] = ("all",)
    exclude: tuple[str, ...] = ()
    variants: dict[str, VariantSpec] = field(default_factory=dict)
    ratios: tuple[float | str, ...] = (0.25, 0.0625)
    trained_ratios: tuple[float | str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    latency: LatencySpec = field(default_factory=LatencySpec)

    def __post_init__(self) -> None:
        for axis in ("backbones", "tasks", "datasets", "seeds", "ratios"):
            if not getattr(self, axis):
                raise ValueError(f"{axis} must not be empty")
        for label in [self.name, *self.backbones, *self.tasks, *self.datasets, *self.variants]:
            if not label or not all(ch.isalnum() or ch in "_.+=" for ch in label):
                raise ValueError(f"name {label!r} must be letters, digits and _ . + = (it names files)")
        self.ratio_values()  # checks every ratio
        self.ratio_values(trained=True)

    def ratio_values(self, trained: bool = False) -> tuple[float, ...]:
        """The target ratios as floats, in the file's order (``trained``: those of the trained-in arms)."""
        values = []
        axis = "trained_ratios" if trained and self.trained_ratios else "ratios"
        for ratio in getattr(self, axis):
            try:
                if isinstance(ratio, str) and "/" in ratio:
                    num, den = ratio.split("/", 1)
                    value = float(num) / float(den)
                else:
                    value = float(ratio)
            except (ValueError, ZeroDivisionError) as exc:
                raise ValueError(f"{axis}: {ratio!r} is not a number or a fraction such as 1/4") from exc
            if not 0.0 < value < 1.0:
                raise ValueError(f"{axis}: {ratio!r} must be in (0, 1) (Native is the ratio 1 of every setting)")
            if value in values:
                raise ValueError(f"{axis}: {ratio!r} repeats the ratio {value:g}")
            values.append(value)
        return tuple(values)


def suites_dir() -> Path:
    """``configs/suites`` of the working directory, else of the repository this package was installed from."""
    if SUITES_DIR.is_dir():
        return SUITES_DIR
    return Path(__file__).resolve().parents[3] / SUITES_DIR


def known_suites(root: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (root or suites_dir()).glob("*.yaml"))


def find_suite(name: str, root: Path | None = None) -> Path:
    """The YAML file of suite ``name`` (a name under ``configs/suites/``, or a path to a YAML file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    root = root or suites_dir()
    candidate = root / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(known_suites(root)) or f"none (no {root}/*.yaml: run from the repository root)"
    if path.is_file():
        raise ConfigError(f"suite file {name!r} is not a .yaml file; known suites: {known}")
    raise ConfigError(f"unknown suite {name!r}; known suites: {known}")


def load_suite(name: str, root: Path | None = None) -> SuiteSpec:
    """Load and check a suite: its keys (by name), its ratios, every setting's run config and every variant's
    scheme and knobs, before any work."""
    path = find_suite(name, root)
    try:
        spec = from_dict(SuiteSpec, load_yaml(path))
        settings(spec)
        check_variants(spec)
    except ConfigError as exc:
        raise ConfigError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from exc
    return spec


def check_variants(spec: SuiteSpec) -> None:
    """Build every variant's scheme once (a training-free policy at the suite's first ratio, a trained-in scheme on
    the first setting's model), so a bad name or knob fails at load, naming the variant.

    Raises:
        ConfigError: ``variants.<label>: <the scheme's error>``.
    """
    from malloc.memory.registry import build_policy

    found = settings(spec)
    model = found[0].cfg.model if found else None
    for label, variant in spec.variants.items():
        try:
            if variant.scheme in ARCHITECTURES:
                if model is not None:
                    build_architecture(replace(model, scheme=variant.scheme, memory_ratio=spec.ratio_values()[0],
                                               knobs=dict(variant.knobs)))
            else:
                build_policy(variant.scheme, spec.ratio_values()[0], **variant.knobs)
        except SchemeError as exc:
            raise ConfigError(f"variants.{label}: {exc}") from exc


# -- expansion ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One (data set, backbone, task, seed) of a suite and its Native run config."""

    dataset: str
    backbone: str
    task: str
    seed: int
    cfg: RunConfig

    @property
    def key(self) -> str:
        return f"{self.dataset}-{self.backbone}-{self.task}-s{self.seed}"

    @property
    def config_hash(self) -> str:
        """A hash of the run config, results folder aside: a record made under another config is not reused."""
        return config_hash({k: v for k, v in to_dict(self.cfg).items() if k != "results_dir"})


@dataclass(frozen=True)
class Item:
    """One unit of suite work.

    Attributes:
        id: unique in the suite, names the record file: ``<setting key>--<label>[-r<ratio>]``.
        kind: ``native``, ``policy`` or ``trained``.
        label: the arm's name in reports (the scheme name, or a variant's label).
        scheme: the registered scheme or wrapper name.
        knobs: knobs given to the scheme.
        ratios: the target ratios this item stands for (Native: ``(1.0,)``; a trained-in item trains at the first).
        plan_error: why the item cannot run (found while planning), or None.
    """

    id: str
    setting: Setting
    kind: str
    label: str
    scheme: str
    knobs: dict[str, Any]
    ratios: tuple[float, ...]
    plan_error: str | None = None

    def describe(self) -> dict[str, Any]:
        """The item's identity, as its record and ``suite.json`` store it."""
        s = self.setting
        return {"item": self.id, "kind": self.kind, "label": self.label, "scheme": self.scheme, "knobs": self.knobs,
                "family": {"native": REFERENCE, "policy": TRAINING_FREE, "trained": TRAINED_IN}[self.kind],
                "memory_ratio_target": self.ratios[0], "memory_ratio_targets": list(self.ratios),
                "dataset": s.dataset, "backbone": s.backbone, "task": s.task, "seed": s.seed,
                "setting": s.key, "config": s.config_hash}


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of partial configs: mappings merge key by key, anything else in ``extra`` replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def settings(spec: SuiteSpec, results_dir: str | Path = "results", data_paths: Mapping[str, str] | None = None
             ) -> list[Setting]:
    """Every (data set, backbone, task, seed) of the suite with its run config, in that nesting order.

    A data set with ``needs_path`` and no path (``data_paths[label]`` or ``data.path``) is left out.

    Raises:
        ConfigError: a partial config with an unknown key or a bad value (the axis and label are named).
    """
    data_paths = dict(data_paths or {})
    unknown = sorted(set(data_paths) - set(spec.datasets))
    if unknown:
        raise ConfigError(f"--data {unknown[0]}: not a data set of suite {spec.name} "
                          f"(its data sets: {', '.join(spec.datasets)})")
    runs_dir = str(Path(results_dir) / spec.name / "runs")
    found = []
    for dataset, dspec in spec.datasets.items():
        data_cfg = dspec.config
        if dataset in data_paths:
            data_cfg = _merge(data_cfg, {"data": {"path": data_paths[dataset]}})
        if dspec.needs_path and not data_cfg.get("data", {}).get("path"):
            continue
        try:  # a wrong source or path fails now, not in every item
            data = from_dict(RunConfig, _merge(spec.base, data_cfg)).data
            input_files(data.source, data.path)
        except DataError as exc:
            raise ConfigError(f"datasets.{dataset}: {exc}") from exc
        for backbone, bconf in spec.backbones.items():
            for task, tconf in spec.tasks.items():
                for seed in spec.seeds:
                    merged = spec.base
                    for where, part in ((f"backbones.{backbone}", _merge({"model": {"backbone": backbone}}, bconf)),
                                        (f"tasks.{task}", _merge({"task": task}, tconf)),
                                        (f"datasets.{dataset}.config", data_cfg)):
                        if not isinstance(part, Mapping):
                            raise ConfigError(f"{where}: expected a mapping (a partial run config)")
                        merged = _merge(merged, part)
                    merged = _merge(merged, {"name": f"{dataset}-{backbone}-{task}", "results_dir": runs_dir,
                                             "train": {"seed": seed}})
                    try:
                        cfg = from_dict(RunConfig, merged)
                    except ConfigError as exc:
                        raise ConfigError(f"setting {dataset}/{backbone}/{task}: {exc}") from exc
                    found.append(Setting(dataset, backbone, task, seed, cfg))
    return found


def selected_arms(spec: SuiteSpec) -> list[tuple[str, str, dict[str, Any]]]:
    """``(label, scheme, knobs)`` of every arm besides Native, in registry order then the variants'.

    Raises:
        ConfigError: an unknown scheme name (the registered ones are listed).
    """
    registered = {**{name: TRAINING_FREE for name in POLICIES}, **{name: TRAINED_IN for name in ARCHITECTURES}}
    chosen: list[str] = []
    for index, entry in enumerate(spec.schemes):
        if entry in SCHEME_GROUPS:
            chosen += [n for n, family in registered.items() if entry == "all" or family == entry]
        elif entry in registered:
            chosen.append(entry)
        else:
            raise ConfigError(f"schemes[{index}]: unknown scheme {entry!r}; registered: {', '.join(registered)} "
                              f"(or one of {', '.join(SCHEME_GROUPS)}; wrappers go under variants)")
    for index, entry in enumerate(spec.exclude):
        if entry not in registered:
            raise ConfigError(f"exclude[{index}]: unknown scheme {entry!r}; registered: {', '.join(registered)}")
    arms = [(name, name, {}) for name in dict.fromkeys(chosen) if name != "native" and name not in spec.exclude]
    return arms + [(label, variant.scheme, dict(variant.knobs)) for label, variant in spec.variants.items()]


def _ratio_tag(ratio: float) -> str:
    return f"r{ratio:g}"


def _trained_groups(cfg: RunConfig, scheme: str, knobs: dict[str, Any], ratios: Sequence[float]
                    ) -> list[tuple[float, ...]]:
    """Ratios grouped by the model they resolve to (knobs in force, stored bytes at a few lengths); a scheme that
    declares no ratio knob (``ratio_knob = False``) builds one model for all of them."""
    if not getattr(ARCHITECTURES[scheme], "ratio_knob", True):
        build_architecture(replace(cfg.model, scheme=scheme, memory_ratio=ratios[0], knobs=knobs))  # checks knobs
        return [tuple(ratios)]
    groups: dict[str, list[float]] = {}
    for ratio in ratios:
        model = replace(cfg.model, scheme=scheme, memory_ratio=ratio, knobs=knobs)
        arch = build_architecture(model)
        assert arch is not None
        key = json.dumps([arch.knob_values(model), [arch.state_bytes(model, n) for n in _PROBE_LENGTHS]],
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(ratio)
    return [tuple(g) for g in groups.values()]


def plan(spec: SuiteSpec, results_dir: str | Path = "results", data_paths: Mapping[str, str] | None = None
         ) -> list[Item]:
    """Every item of the suite: per setting, Native first, then the training-free arms, then the trained-in ones."""
    arms = selected_arms(spec)
    ratios, trained_ratios = spec.ratio_values(), spec.ratio_values(trained=True)
    items = []
    for setting in settings(spec, results_dir, data_paths):
        key = setting.key
        items.append(Item(f"{key}--native", setting, "native", "native", "native", {}, (1.0,)))
        for label, scheme, knobs in arms:
            if scheme in ARCHITECTURES:
                continue
            for ratio in ratios:
                items.append(Item(f"{key}--{label}-{_ratio_tag(ratio)}", setting, "policy", label, scheme, knobs,
                                  (ratio,)))
        for label, scheme, knobs in arms:
            if scheme not in ARCHITECTURES:
                continue
            try:
                groups = _trained_groups(setting.cfg, scheme, knobs, trained_ratios)
            except SchemeError as exc:
                items.append(Item(f"{key}--{label}", setting, "trained", label, scheme, knobs, trained_ratios,
                                  str(exc)))
                continue
            for group in groups:  # named by the ratio it trains at; the record lists every ratio it stands for
                items.append(Item(f"{key}--{label}-{_ratio_tag(group[0])}", setting, "trained", label, scheme,
                                  knobs, group))
    return items


def select_items(items: Sequence[Item], patterns: Sequence[str], among: Sequence[Item] | None = None) -> list[Item]:
    """The items whose id matches one of ``patterns`` (shell globs, e.g. ``*rwkv*`` or ``*-r0.25``), ordered by
    the first pattern each matches, then by plan order: ``["*-r0.25", "*"]`` runs every ratio-1/4 item first.

    Args:
        items: the items to choose from, in plan order (a shard's).
        patterns: the globs; none selects every item in plan order.
        among: the whole plan, against which each pattern must match at least one item (default: ``items``).
    Raises:
        ConfigError: a pattern that matches no item of the plan (a typo would otherwise run nothing).
    """
    if not patterns:
        return list(items)
    plan_ids = [item.id for item in (items if among is None else among)]
    for pattern in patterns:
        if not fnmatch.filter(plan_ids, pattern):
            example = plan_ids[0] if plan_ids else "none planned"
            raise ConfigError(f"--only {pattern!r} matches no item of the suite (items are named <data set>-"
                              f"<backbone>-<task>-s<seed>--<label>[-r<ratio>], e.g. {example})")
    def first_match(item: Item) -> int | None:
        return next((k for k, pattern in enumerate(patterns) if fnmatch.fnmatchcase(item.id, pattern)), None)

    ranked = [(rank, item) for item in items if (rank := first_match(item)) is not None]
    return [item for _, item in sorted(ranked, key=lambda pair: pair[0])]  # stable: plan order within a pattern


__all__ = ["DatasetSpec", "Item", "Setting", "SuiteSpec", "VariantSpec", "find_suite", "known_suites", "load_suite",
           "plan", "select_items", "settings"]
