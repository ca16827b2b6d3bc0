"""Search-space files: a base run config, a space over dotted keys, the searcher, scheduler, budget, resources.

    name: molre_hparams                 # experiment name: stable, resume depends on it
    base: {backbone: {preset: tiny-vit}, ...}      # any run config (molre.config)
    space:
      adapter.kind: {choice: [none, molre]}
      adapter.molre.experts: {choice: [2, 4, 6], when: {adapter.kind: molre}}
      adapter.molre.rank: {int: [4, 16]}
      optim.lr_adapter: {logfloat: [1.0e-5, 1.0e-3]}
      loss.gamma: {float: [0.0, 3.0]}
    search: {algorithm: optuna | grid, num_samples: 16, seeds: [0, 1, 2],
             objectives: [[val/best_mean_auc, max], [params/trainable, min]]}
    scheduler: {asha: {grace_period: 2, reduction_factor: 2}}    # or null
    budget: {time_s: 3600}
    resources: {num_workers: 1, gpus_per_worker: 0.25, cpus_per_worker: 1, max_concurrent_trials: null,
                trial_max_failures: 3}
    multi_fidelity: {confirm_top: 2, cache: null}   # optional: screen on cached features, confirm the best

Everything is validated before any trial starts (``load_sweep``): unknown keys, empty choices, low > high, a
condition on a key the space does not define, and every sampled point must build a valid run config whose
backbone preset exists and takes its adapter (no MoLRE on an attention-free preset).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from molre.config import Bool, Float, Int, RunConfig, _format_error, build_config, read_yaml
from molre.errors import ConfigError

KINDS = ("choice", "int", "float", "logfloat")
MAX_INT = 2**53  # int bounds beyond this are typos (and overflow numpy's int64 sampling)
MAX_GRID_POINTS = 10_000  # each point is a training run: a bigger grid is a mistake, not an experiment


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dimension(_Strict):
    """One searched key: exactly one of choice / int / float / logfloat, optionally conditional."""

    # the field names are the YAML words; config's Int / Float keep the types unambiguous in the class body
    choice: list[Any] | None = None
    int: tuple[Int, Int] | None = None
    float: tuple[Float, Float] | None = None
    logfloat: tuple[Float, Float] | None = None
    when: dict[str, Any] | None = None  # {other.key: value or [values]}: searched only when it holds

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(KINDS)}, got {given or 'none'}")
        kind = given[0]
        if kind == "choice" and not self.choice:
            raise ValueError("empty choice")
        if kind != "choice":
            lo, hi = getattr(self, kind)
            if kind == "int" and max(abs(lo), abs(hi)) > MAX_INT:
                raise ValueError(f"int bounds must lie within +-2**53, got [{lo}, {hi}]")
            if kind != "int" and not math.isfinite(hi - lo):  # inf, nan, or a range wider than a float
                raise ValueError(f"bounds must be finite numbers, got [{lo}, {hi}]")
            if lo > hi:
                raise ValueError(f"low {lo} > high {hi}")
            if kind == "logfloat" and lo <= 0:
                raise ValueError(f"logfloat needs a positive low, got {lo}")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def grid_values(self) -> list[Any]:
        if self.kind == "choice":
            return list(self.choice)
        if self.kind == "int":
            if self.int[1] - self.int[0] >= MAX_GRID_POINTS:
                raise ConfigError(f"int range {list(self.int)} has more than {MAX_GRID_POINTS} grid values")
            return list(range(self.int[0], self.int[1] + 1))
        raise ConfigError(f"a grid needs choice or int dimensions; {self.kind} cannot be enumerated")

    def holds(self, point: dict[str, Any]) -> bool:
        for key, wanted in (self.when or {}).items():
            allowed = wanted if isinstance(wanted, list) else [wanted]
            if key not in point or point[key] not in allowed:
                return False
        return True


class SearchConfig(_Strict):
    algorithm: Literal["optuna", "grid"] = "optuna"
    num_samples: Int = Field(8, gt=0)  # optuna: configurations to try (each repeated over the seeds)
    limit: Int | None = Field(None, gt=0)  # grid: only the first N points (smoke runs)
    seeds: list[Int] = Field([0], min_length=1)
    objectives: list[tuple[str, Literal["max", "min"]]] = Field([("val/best_mean_auc", "max")], min_length=1)

    @property
    def metric(self) -> str:
        return self.objectives[0][0]

    @property
    def mode(self) -> str:
        return self.objectives[0][1]


class ASHAConfig(_Strict):
    grace_period: Int = Field(2, gt=0)  # epochs before a trial can be stopped
    reduction_factor: Float = Field(2.0, gt=1)


class SchedulerConfig(_Strict):
    asha: ASHAConfig | None = None


class BudgetConfig(_Strict):
    time_s: Float | None = Field(None, gt=0)  # stop starting new trials after this long


class ResourcesConfig(_Strict):
    num_workers: Int = Field(1, gt=0)  # Ray Train workers per trial
    cpus_per_worker: Float = Field(1.0, gt=0)
    gpus_per_worker: Float = Field(1.0, gt=0)  # used when GPUs exist; < 1 packs small backbones on one GPU
    max_concurrent_trials: Int | None = Field(None, gt=0)  # None: as many as the cluster's resources allow
    # a finished trial's actor runs the next trial (Tune's reuse_actors): saves a process start and the
    # torch/timm imports per trial; false gives every trial a fresh process
    reuse_actors: Bool = True
    # Tune re-runs a failed trial (a lost worker or node, e.g. a spot reclaim) from its last checkpoint up to this
    # many times (-1: without limit); inside a trial, Train first restarts lost workers scaling.max_failures times
    trial_max_failures: Int = Field(3, ge=-1)


class MultiFidelityConfig(_Strict):
    """Screen every point on cached frozen-backbone features (``molre.tune.features``), then re-run the
    ``confirm_top`` best points end to end over all seeds (``molre.tune.multifidelity``)."""

    confirm_top: Int = Field(2, gt=0)
    cache: str | None = (
        None  # feature cache root (local or s3://): <cache>/features/<key>/; default: <storage>
    )
    # train features cached for this many augmented copies of each volume (0: un-augmented); a screen epoch
    # trains on copy epoch % N, as the end-to-end run sees a fresh augmentation every epoch
    augment_copies: Int = Field(0, ge=0, le=64)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict = {}
    space: dict[str, Dimension] = {}
    search: SearchConfig = SearchConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    budget: BudgetConfig = BudgetConfig()
    resources: ResourcesConfig = ResourcesConfig()
    multi_fidelity: MultiFidelityConfig | None = None

    @model_validator(mode="after")
    def _conditions_name_space_keys(self):
        for key, dim in self.space.items():
            for other in dim.when or {}:
                if other not in self.space and other != key:
                    raise ValueError(f"space.{key}: condition on {other!r}, which the space does not define")
        return self


def _sample_value(dim: Dimension, rng) -> Any:
    if dim.kind == "choice":
        return dim.choice[rng.integers(len(dim.choice))]
    if dim.kind == "int":
        return int(rng.integers(dim.int[0], dim.int[1] + 1))
    if dim.kind == "float":
        return float(rng.uniform(*dim.float))
    lo, hi = dim.logfloat
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def random_point(spec: SweepSpec, rng) -> dict[str, Any]:
    """A point sampled in declaration order, skipping dimensions whose condition does not hold."""
    point: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if dim.holds(point):
            point[key] = _sample_value(dim, rng)
    return point


def active_keys(spec: SweepSpec, values: dict[str, Any]) -> list[str]:
    """The space's keys searched for a trial whose keys take ``values`` (e.g. its run config, flattened): those
    whose condition holds, judged in declaration order as ``random_point`` and ``grid_points`` judge it."""
    active: dict[str, Any] = {}
    for key, dim in spec.space.items():
        if dim.holds(active):
            active[key] = values.get(key)
    return list(active)


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """The exhaustive grid over the space, conditional keys only where their condition holds."""
    points: list[dict[str, Any]] = [{}]
    for key, dim in spec.space.items():
        expanded: list[dict[str, Any]] = []
        for point in points:
            if dim.holds(point):
                try:
                    values = dim.grid_values()
                except ConfigError as err:
                    raise ConfigError(f"space.{key}: {err}") from None
                expanded.extend({**point, key: value} for value in values)
            else:
                expanded.append(point)
            if len(expanded) > MAX_GRID_POINTS:
                raise ConfigError(
                    f"the grid has more than {MAX_GRID_POINTS} points: narrow the space or use optuna"
                )
        points = expanded
    return points[: spec.search.limit] if spec.search.limit else points


class OptunaSpace:
    """Optuna define-by-run space: conditional keys are suggested only when their condition holds.

    A class (not a closure) because Tune pickles the searcher, and with it this callable, to resume sweeps.
    """

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def __call__(self, trial) -> None:
        point: dict[str, Any] = {}
        for key, dim in self.spec.space.items():
            if not dim.holds(point):
                continue
            if dim.kind == "choice":
                point[key] = trial.suggest_categorical(key, dim.choice)
            elif dim.kind == "int":
                point[key] = trial.suggest_int(key, *dim.int)
            else:
                lo, hi = dim.float if dim.kind == "float" else dim.logfloat
                point[key] = trial.suggest_float(key, lo, hi, log=dim.kind == "logfloat")


def run_config_for(spec: SweepSpec, point: dict[str, Any], seed: int | None = None) -> RunConfig:
    overrides = dict(point)
    if seed is not None:
        overrides["train.seed"] = seed
    return build_config(spec.base, overrides, source=f"sweep {spec.name} point {point}")


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """Parse and fully validate a search-space file; ``overrides`` (``key=value``) apply to its ``base``."""
    from molre.config import parse_overrides, set_dotted

    raw = read_yaml(path)
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, str(path))) from None
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(spec.base, key, value)
    check_objectives(spec, str(path))
    validate_points(spec, str(path))
    return spec


def reported_metrics() -> set[str]:
    """Names a trial reports (per epoch or in its final row) that a sweep can rank by; ``router/usage/...`` aside."""
    from molre.findings import FINDING_IDS
    from molre.train.metrics import summarize

    per_epoch = {"val/mean_auc", "val/best_mean_auc", "train/loss", "epoch", "best_epoch"}
    summary = set(summarize([0.5] * len(FINDING_IDS)).as_dict("val/"))
    final = {
        "epochs",
        "router/entropy",
        *(f"params/{k}" for k in ("total", "trainable", "molre", "molre_share")),
    }
    aucs = {f"{prefix}auc/{fid}" for fid in FINDING_IDS for prefix in ("", "val/")}
    return per_epoch | summary | final | aucs


def check_objectives(spec: SweepSpec, source: str) -> None:
    """A misspelt objective would fail only at a trial's first report: name it now, with the nearest names."""
    import difflib
    import re

    from molre.findings import CATEGORY_SIZES

    known = reported_metrics()
    usage = re.compile(rf"router/usage/({'|'.join(map(re.escape, CATEGORY_SIZES))})/\d+")
    for name, _ in spec.search.objectives:
        if name not in known and not usage.fullmatch(name):
            near = difflib.get_close_matches(name, sorted(known), n=3)
            hint = (
                f"; did you mean {', '.join(near)}?" if near else " (see molre.tune.space.reported_metrics)"
            )
            raise ConfigError(f"{source}: search.objectives: {name!r} is not a metric trials report{hint}")


def validate_points(spec: SweepSpec, source: str, samples: int = 16) -> None:
    """Every grid point (or a sample of random points) must build a valid run config its preset can take."""
    import numpy as np

    build_config(spec.base, source=f"{source}: base")
    unknown = [k for k in spec.space if not _is_config_key(k)]
    if unknown:
        raise ConfigError(f"{source}: space key {unknown[0]!r} is not a run-config key")
    if spec.search.algorithm == "grid":
        try:
            points = grid_points(spec)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    else:
        rng = np.random.default_rng(0)
        points = [random_point(spec, rng) for _ in range(samples)]
    for point, seed in itertools.product(points, spec.search.seeds[:1]):
        try:
            cfg = run_config_for(spec, point, seed)
        except ConfigError as err:
            raise ConfigError(f"{source}: the space reaches an invalid run config:\n{err}") from None
        _check_preset_takes_adapter(cfg, point, source)
        if spec.multi_fidelity is not None:
            _check_screenable(cfg, point, source)
    if spec.multi_fidelity is not None and len(spec.search.objectives) > 1:
        raise ConfigError(f"{source}: multi_fidelity ranks the screen by one metric; give one objective")


def _check_preset_takes_adapter(cfg: RunConfig, point: dict, source: str) -> None:
    """A valid config can still name a preset the model builder refuses (unknown, or MoLRE on an attention-free
    preset such as deepcntd): ask the preset registry now, not at the trial's first step."""
    from molre.errors import ModelError
    from molre.models.backbones import get_preset

    try:
        preset = get_preset(cfg.backbone.preset)
    except ModelError as err:
        raise ConfigError(f"{source}: point {point}: {err}") from None
    if cfg.adapter.kind == "molre" and not preset.supports_molre:
        raise ConfigError(
            f"{source}: point {point}: preset {preset.name} cannot take adapter.kind=molre (attention-free); "
            "give it adapter.kind=none, e.g. with a `when` condition that leaves it out and a base of none"
        )


def _check_screenable(cfg: RunConfig, point: dict, source: str) -> None:
    """Every point of a multi-fidelity sweep must be trainable on cached features (frozen backbone)."""
    from molre.tune.features import check_cacheable

    try:
        check_cacheable(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: multi_fidelity: point {point}: {err}") from None


def _is_config_key(key: str) -> bool:
    node: Any = RunConfig
    for part in key.split("."):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return False
        node = fields[part].annotation
    return True
