"""One typed config tree for a run: backbone, adapter, data, optim, loss, train, scaling.

Loaded from YAML (``load_config``) with dotted ``key=value`` overrides (``adapter.molre.experts=4``).
Unknown keys and wrong types are ``ConfigError``s naming the dotted key. Defaults are the paper's settings.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from molre.errors import ConfigError


def _not_a_bool(value):
    if isinstance(value, bool | np.bool_):  # pydantic's lax mode would read true as 1
        raise ValueError("expected a number, not true/false")
    return value


def _only_a_bool(value):
    if not isinstance(value, bool | np.bool_):  # lax mode would read 0 / "yes" / "off" as booleans
        raise ValueError("expected true or false")
    return bool(value)


# numbers and flags without pydantic's lax crossings between them (strings like "1e-3" still read as numbers:
# YAML 1.1 parses 1e-3 without a dot as a string)
Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]
Bool = Annotated[bool, BeforeValidator(_only_a_bool)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BackboneConfig(_Strict):
    preset: str = "tiny-vit"  # a name from molre.models.backbones.PRESETS
    weights: str | None = (
        None  # local path or s3:// URI (safetensors or torch); "{preset}" is filled in; None = random
    )
    image_size: Int | None = Field(
        None, gt=0
    )  # slice (2D) or volume side (3D); None = the preset's native size
    finetune: Literal["lora", "full", "frozen"] | None = None  # None = the preset's default (paper protocol)
    # scale the 0..1 HU windows to the pretrained preset's input statistics (ImageNet mean / std for DINOv3
    # and MedImageInsight, [-1, 1] for MedGemma); no effect on presets without them (3D stand-ins, tiny models)
    normalize: Bool = True


class LoRAConfig(_Strict):
    rank: Int = Field(8, gt=0)
    alpha: Float = Field(16.0, gt=0)  # update scale = alpha / rank
    dropout: Float = Field(0.0, ge=0, lt=1)
    targets: list[str] | None = None  # attention linear names (suffix match); None = the preset's
    blocks: Literal["all"] | list[Int] = "all"  # which transformer blocks get adapters


class MoLREConfig(_Strict):
    experts: Int = Field(6, gt=0)  # K
    rank: Int = Field(8, gt=0)  # r of each expert
    router_hidden: Int = Field(256, gt=0)  # d_h
    placement: Literal["features", "blocks"] = "features"  # paper: on slice features before pooling
    # blocks placement: one gate per slice (mean of its tokens; the paper's per-slice routing, +3.7% FLOPs over
    # LoRA on dinov3-base) or per token (+11.4%). features placement routes each slice either way.
    route_by: Literal["slice", "token"] = "slice"
    top_k: Int | None = Field(None, gt=0)  # None = soft routing over all K (paper)
    balance_loss_weight: Float = Field(0.0, ge=0)  # load-balancing auxiliary loss, off in the paper
    dropout: Float = Field(0.0, ge=0, lt=1)  # on the expert input

    @model_validator(mode="after")
    def _top_k_fits(self):
        if self.top_k is not None and self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class AdapterConfig(_Strict):
    kind: Literal["none", "molre"] = "molre"  # none = the paper's "Base AUC" column, molre = "+MoLRE"
    lora: LoRAConfig = LoRAConfig()
    molre: MoLREConfig = MoLREConfig()


class AugmentConfig(_Strict):
    """The paper's augmentations (Sec. 3.1), applied batched on the training device."""

    enabled: Bool = True
    elastic_alpha: tuple[Float, Float] = (0.0, 200.0)
    elastic_sigma: tuple[Float, Float] = (10.0, 13.0)
    rotate: Float = Field(0.1, ge=0)  # +- radians, each axis
    scale: tuple[Float, Float] = (0.85, 1.15)  # anisotropic, per axis
    brightness: tuple[Float, Float] = (0.99, 1.01)  # multiplicative
    noise_variance: tuple[Float, Float] = (0.0, 0.03)  # additive Gaussian, variance drawn per volume
    flip_prob: Float = Field(0.5, ge=0, le=1)  # per axis


class DataConfig(_Strict):
    uri: str = ""  # preprocessed shard root (local path or s3://); empty = the synthetic default
    windows: list[tuple[Float, Float]] = [(0.0, 80.0), (-20.0, 180.0), (-800.0, 2000.0)]  # HU -> 3 channels
    num_slices: Int | None = Field(
        None, gt=0
    )  # slices fed to the model (resampled along z); None = grid depth
    rfs_threshold: Float = Field(0.1, gt=0, le=1)  # LVIS t in r(c) = max(1, sqrt(t / f(c)))
    augment: AugmentConfig = AugmentConfig()


class OptimConfig(_Strict):
    lr_head: Float = Field(1e-3, gt=0)  # attention pooling + classifier
    lr_adapter: Float = Field(1e-4, gt=0)  # LoRA + MoLRE
    lr_backbone: Float = Field(1e-5, gt=0)  # only for finetune=full
    weight_decay: Float = Field(0.01, ge=0)
    grad_clip: Float | None = Field(1.0, gt=0)


class LossConfig(_Strict):
    gamma: Float = Field(2.0, ge=0)
    alpha: Literal["prevalence"] | Float | None = "prevalence"  # per-class alpha_t from train prevalence
    alpha_clip: tuple[Float, Float] = (0.25, 0.95)  # bounds for prevalence-based alpha


class TrainConfig(_Strict):
    max_epochs: Int = Field(50, gt=0)
    min_epochs: Int = Field(20, ge=0)  # paper: at least 20 epochs
    patience: Int = Field(5, gt=0)  # early stop after this many epochs without val mean-AUC gain
    batch_size: Int = Field(2, gt=0)  # volumes per worker per step
    seed: Int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    # torch.compile: regional = each transformer block (one block's compile time, reused by the others), model =
    # the whole classifier, auto = regional on GPU and off on CPU; true/false mean regional/off
    compile: Literal["auto", "off", "regional", "model"] = "auto"
    # frozen backbone linears' matrix products: auto = as the precision (bf16 weights under bf16 autocast), fp8 =
    # e4m3 with row-wise scales on FP8 tensor cores (compute capability >= 8.9; molre.models.fp8)
    frozen_matmul: Literal["auto", "fp8"] = "auto"
    tf32: Bool = True  # TF32 tensor cores for the fp32 matmuls / convs left on a GPU (all of them with fp32)
    # recompute each transformer block (3D DenseNet: each dense layer) in the backward pass instead of keeping its
    # activations: ~1/3 more compute, a fraction of the memory (MedGemma at 896^2 with 32 slices per volume;
    # deepcntd at 32 x 224^2: 898 -> 325 MiB per volume; molre.models.runtime)
    activation_checkpointing: Bool = False
    # keep this worker's validation volumes (decoded int16, host RAM) from the first epoch on
    cache_val: Bool = True
    # keep each worker's train rows (host RAM) when its share, at 2*D*H*W bytes + 1 KiB a row, fits; epochs >= 1
    # are then shuffled whole (else a 32-row window over the streamed shards); 0 = never
    cache_train_gb: Float = Field(4.0, ge=0)
    run_name: str = "molre"
    storage: str = "runs"  # local path or s3:// for checkpoints and results

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_bool(cls, value):
        return ("regional" if value else "off") if isinstance(value, bool) else value


class ScalingConfig(_Strict):
    num_workers: Int = Field(1, gt=0)
    use_gpu: Bool | Literal["auto"] = "auto"
    cpus_per_worker: Float = Field(1.0, gt=0)
    gpus_per_worker: Float = Field(1.0, gt=0)  # fractions share a GPU between small-backbone trials
    max_failures: Int = Field(0, ge=-1)  # Ray Train FailureConfig; -1 = unlimited


class RunConfig(_Strict):
    backbone: BackboneConfig = BackboneConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()


# the parts of an error's location that name a union member's type, not a key: "literal['all']",
# "function-before[_not_a_bool(), int]", "list[...]" (keys never hold brackets)
_TYPE_TAG = re.compile(r"[a-z-]+\[.*\]")


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not _TYPE_TAG.fullmatch(str(p))) or "<root>"
        got = f" (got {e['input']!r})" if e["type"] != "missing" and "input" in e else ""
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key}: {msg}{got}")
    return f"invalid config {source}:\n" + "\n".join(dict.fromkeys(lines))


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; values are parsed as YAML scalars / lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML") from None
    return out


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key="a.b.c"``, creating dicts on the way (validation judges them)."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])} is a value, so {key} cannot be set")
        node = child
    node[parts[-1]] = value


def flat_dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: every leaf of a nested config dict under its dotted key."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def get_dotted(tree: dict, key: str) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def build_config(
    raw: dict | None = None, overrides: dict[str, Any] | None = None, source: str = ""
) -> RunConfig:
    """Validate a raw dict (plus dotted overrides) into a ``RunConfig``."""
    tree = copy.deepcopy(raw or {})
    if not isinstance(tree, dict):
        raise ConfigError(f"invalid config {source}: top level must be a mapping, got {type(tree).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source or "<dict>")) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        return parse_yaml(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None


def parse_yaml(data: bytes, path: str) -> dict:
    """A YAML mapping from a config file's bytes; every problem a ``ConfigError`` naming ``path``."""
    try:
        tree = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ConfigError(f"config file {path} is not valid YAML: nested too deeply") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from YAML (or the defaults) and apply ``key=value`` overrides."""
    raw = read_yaml(path) if path else {}
    return build_config(raw, parse_overrides(overrides or []), source=str(path or "<defaults>"))


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain JSON/YAML-safe dict (tuples become lists)."""
    return cfg.model_dump(mode="json")
