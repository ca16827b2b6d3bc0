"""Training checkpoints: what a worker saves each epoch and what ``evaluate`` / ``predict`` load.

A checkpoint directory holds
  model.safetensors   trained state of this epoch: trainable parameters (LoRA, MoLRE, pooling, head; all weights
                      if finetune=full) and persistent buffers (BatchNorm running statistics)
  best.safetensors    the same for the best validation epoch so far (what results report)
  optimizer.pt        AdamW state of this epoch
  state.json          epoch, best epoch and metric, epochs without gain, history of per-epoch metrics, finished
  config.yaml         the full run config (the frozen backbone is rebuilt from it: preset + weights URI)
  setup.json          data facts of the run: voxel spacing, grid, model input size, the preprocessing's
                      anti-aliasing, minimum slice count, HU range, pad value, alignment and interpolation
                      (predict prepares a series the same way; evaluate refuses data preprocessed otherwise),
                      and the sha256 of the frozen weights it was built with (``frozen_digest``)
  val_outputs.npz     validation scores / labels / known / mean routing weights of the best epoch
  fingerprint.json    what defines the run (``run_fingerprint``): its config less ``RESUMABLE_KEYS``, and the
                      sha256 of its dataset's manifest; a re-run under the same run name must match it to resume
Frozen weights are not stored (they are rebuilt from the config), so a DINOv3-Base LoRA+MoLRE checkpoint is ~3 MB,
not 350 MB; their digest is, and a rebuild that differs (the weights file replaced) is refused (``check_frozen``).
Buffers are stored, since training changes them even under a frozen backbone: a BatchNorm in train mode updates
its running statistics (DeepCNTD: 264 buffers, 52,200 numbers; the ViT presets have none).

The readers take a local directory or an ``s3://`` URI: each file is read through ``molre.data.storage`` (with its
retries), and every error names the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file

from molre.config import RunConfig, build_config, config_to_dict, flat_dotted, parse_yaml
from molre.data import storage
from molre.data.ingest import DEFAULT_MIN_SLICES
from molre.errors import ConfigError, WeightsError

log = logging.getLogger(__name__)

FROZEN_SHA256 = "frozen_sha256"  # setup.json: frozen_digest of the model the run was built with
# The settings of a manifest's config that decide what a model sees (min_slices: which studies it sees), as
# preprocess records them (PreprocessConfig.as_dict); a checkpoint keeps its training data's in setup.json and
# evaluate compares them with the evaluated data's (``preprocessing_changes``); predict compares RECORDED_AS_IS,
# which it cannot set (constants of this molre's code), with this molre's
RECORDED_AS_IS = ("hu_range", "pad_value", "alignment", "interpolation")  # absent (older molre) = unknown
PREPROCESSING_KEYS = ("grid", "spacing", "antialias", "min_slices", *RECORDED_AS_IS)
SETUP_FACTS = ("grid", "spacing", "input_size", "antialias", "min_slices", *RECORDED_AS_IS, FROZEN_SHA256)
FINGERPRINT = "fingerprint.json"
FINGERPRINT_KEY = "fingerprint"  # setup[FINGERPRINT_KEY]: the run's fingerprint, from the driver's prepare()
# Config keys a re-run may change and still resume: where the run and its data live, how failures are retried,
# what each worker is given, keeps in host RAM or recomputes (activation checkpointing: the same gradients for
# less memory). None of them changes what is computed (the dataset is compared by content instead, its
# manifest's sha256), except that train.cache_train_gb decides whether epochs are shuffled whole: the
# fingerprint records that train order instead, so the budget may change while the order stays. Everything
# else defines the run, scaling.num_workers and scaling.use_gpu included: the worker count decides each
# worker's share of the train split and its random streams (augmentation, dropout), the device decides the
# arithmetic (bf16 autocast under "auto").
RESUMABLE_KEYS = frozenset({
    "train.run_name", "train.storage", "data.uri",
    "scaling.max_failures", "scaling.cpus_per_worker", "scaling.gpus_per_worker",
    "train.cache_val", "train.cache_train_gb", "train.activation_checkpointing",
})  # fmt: skip


@dataclass
class TrainState:
    epoch: int = -1  # last completed epoch
    best_epoch: int = -1
    best_metric: float = float("-inf")
    epochs_without_gain: int = 0
    finished: bool = False
    history: list[dict] = field(default_factory=list)  # one entry per completed epoch, in order

    def record(self, epoch: int, metrics: dict, metric_key: str) -> bool:
        """Add an epoch's metrics; returns True when it is the new best."""
        self.epoch = epoch
        self.history.append({"epoch": epoch, **metrics})
        value = metrics.get(metric_key, float("nan"))
        if value == value and value > self.best_metric:  # NaN never wins
            self.best_metric, self.best_epoch, self.epochs_without_gain = float(value), epoch, 0
            return True
        self.epochs_without_gain += 1
        return False

    def should_stop(self, min_epochs: int, patience: int, max_epochs: int) -> bool:
        done = self.epoch + 1
        return done >= max_epochs or (done >= min_epochs and self.epochs_without_gain >= patience)


def _trained_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and persistent buffers, by state-dict name (non-persistent buffers, e.g. the FP8
    copies of frozen weights, are derived from frozen weights and left out)."""
    params = dict(model.named_parameters())
    own = {n: p for n, p in params.items() if p.requires_grad}
    own.update({n: t for n, t in model.state_dict(keep_vars=True).items() if n not in params})
    return own


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, on the host: trainable parameters + persistent buffers (see the module docstring)."""
    return {n: t.detach().cpu().contiguous() for n, t in _trained_tensors(model).items()}


def load_trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    own = _trained_tensors(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{n} {tuple(state[n].shape)} vs {tuple(own[n].shape)}" for n in own.keys() & state.keys()
                       if state[n].shape != own[n].shape)  # fmt: skip
    if missing or unexpected or misshaped:
        raise WeightsError(
            f"checkpoint {source} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"mis-shaped {misshaped[:5]}"
        )
    with torch.no_grad():
        for name, tensor in own.items():
            tensor.copy_(state[name].to(tensor.device, tensor.dtype))


def frozen_digest(model: torch.nn.Module) -> str:
    """SHA-256 of what a checkpoint does not store: every tensor of a freshly built model that training leaves
    alone (the frozen backbone as read from ``backbone.weights``, or drawn under ``train.seed``), by name, dtype,
    shape and bytes. Take it before any bf16 / FP8 conversion (MedGemma: 1.7 GB of fp32, ~1 s)."""
    trained = _trained_tensors(model).keys()
    return tensors_digest({k: v for k, v in model.state_dict().items() if k not in trained})


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors, in name order, each by name, dtype, shape and bytes: what ``frozen_digest``,
    the trained weights' digest (``scoring.trained_digest``) and a feature cache's ``backbone_digest`` hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def check_frozen(digest: str, recorded: dict, source: str, weights: str | None) -> None:
    """Refuse to use the checkpoint at ``source`` on a frozen backbone other than the one it was trained on:
    ``digest`` (``frozen_digest`` of the model just built) against the one its setup.json ``recorded``
    (checkpoints from before the digest record none: not checked)."""
    expected = recorded.get(FROZEN_SHA256)
    if expected is None or expected == digest:
        return
    origin = f"backbone.weights {weights}" if weights else "train.seed (a random backbone)"
    raise WeightsError(
        f"{source}: the frozen backbone rebuilt from {origin} is not the one this checkpoint was trained on "
        f"(sha256 {digest[:12]}... vs {expected[:12]}...): the weights file was replaced, or this torch / timm "
        "builds the backbone otherwise"
    )


def save_checkpoint(
    directory: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    cfg: RunConfig,
    best_weights: dict[str, torch.Tensor],
    val_outputs: dict[str, np.ndarray] | None,
    setup: dict,
) -> None:
    d = Path(directory)
    save_file(trained_state(model), d / "model.safetensors")
    save_file(best_weights, d / "best.safetensors")
    torch.save(optimizer.state_dict(), d / "optimizer.pt")
    (d / "state.json").write_text(json.dumps(asdict(state), indent=1))
    (d / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    facts = {k: setup[k] for k in SETUP_FACTS if k in setup}
    (d / "setup.json").write_text(json.dumps(facts))
    if setup.get(FINGERPRINT_KEY) is not None:
        (d / FINGERPRINT).write_text(json.dumps(setup[FINGERPRINT_KEY], indent=1, sort_keys=True))
    if val_outputs is not None:
        np.savez_compressed(d / "val_outputs.npz", **val_outputs)


def _file(directory: str | Path, name: str) -> str:
    return storage.join(str(directory), name)


def _read(directory: str | Path, name: str) -> bytes | None:
    """The bytes of ``directory/name`` (a local path or s3://), None when the file is not there."""
    try:
        return storage.read_bytes(_file(directory, name))
    except FileNotFoundError:
        return None


def read_state(directory: str | Path) -> TrainState:
    path = _file(directory, "state.json")
    try:
        data = _read(directory, "state.json")
        if data is None:
            raise FileNotFoundError(path)
        return TrainState(**json.loads(data))
    except (OSError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: not a readable training state ({type(err).__name__})") from None


def read_config(directory: str | Path) -> RunConfig:
    path = _file(directory, "config.yaml")
    data = _read(directory, "config.yaml")
    if data is None:
        raise WeightsError(f"{directory} is not a molre checkpoint (no config.yaml)")
    return build_config(as_written(parse_yaml(data, path)), source=path)


def as_written(raw: dict) -> dict:
    """A config tree an older molre wrote (config.yaml, a fingerprint), completed with what that molre did where
    a key it lacked now defaults to something else: blocks placement routed every token (before ``route_by``),
    a pretrained preset saw the 0..1 windows unscaled (before ``backbone.normalize``)."""
    molre = (raw.get("adapter") or {}).get("molre")
    if isinstance(molre, dict) and molre.get("placement") == "blocks" and "route_by" not in molre:
        molre["route_by"] = "token"
    backbone = raw.get("backbone")
    if (
        isinstance(backbone, dict)
        and "normalize" not in backbone
        and _has_input_stats(backbone.get("preset"))
    ):
        backbone["normalize"] = False
    return raw


def _has_input_stats(preset) -> bool:
    from molre.models.backbones import PRESETS

    return isinstance(preset, str) and preset in PRESETS and PRESETS[preset].input_stats is not None


def read_setup(directory: str | Path) -> dict:
    """The run's data facts (``preprocessing_facts`` gives the ones a checkpoint from before them lacks)."""
    path = _file(directory, "setup.json")
    try:
        data = _read(directory, "setup.json")
        if data is None:
            raise FileNotFoundError(path)
        facts = json.loads(data)
        if not isinstance(facts, dict):
            raise TypeError("not an object")
    except (OSError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: not a readable molre setup ({type(err).__name__})") from None
    return {**facts, **preprocessing_facts(facts)}


def preprocessing_facts(config: dict) -> dict:
    """What ``predict`` must repeat of the data's preprocessing, from a manifest's config (or a checkpoint's
    setup.json): one written before ``antialias`` existed was made without it, with the default minimum. The HU
    range, pad value, alignment and interpolation are passed on as recorded (``RECORDED_AS_IS``)."""
    return {"antialias": bool(config.get("antialias", False)),
            "min_slices": int(config.get("min_slices", DEFAULT_MIN_SLICES)),
            **{k: config[k] for k in RECORDED_AS_IS if k in config}}  # fmt: skip


def preprocessing_changes(
    trained: dict, data: dict, keys: tuple[str, ...] = PREPROCESSING_KEYS, other: str = "data"
) -> tuple[list[str], dict[str, str]]:
    """How data preprocessed per the manifest config ``data`` differs from a checkpoint's training data
    (``trained``: its ``read_setup``), over ``keys``: ``key: X (checkpoint) vs Y (data)`` for each setting that
    differs, and ``{key: why}`` for each one that only one side (or neither) records. ``other`` names the
    second side (predict: "this molre", whose own preprocessing it compares)."""
    trained, data = {**trained, **preprocessing_facts(trained)}, {**data, **preprocessing_facts(data)}
    changes, unknown = [], {}
    for key in keys:
        missing = [side for side, facts in (("checkpoint", trained), (other, data)) if key not in facts]
        if missing:
            unknown[key] = "recorded by neither" if len(missing) == 2 else f"not recorded by the {missing[0]}"
        elif _comparable(trained[key]) != _comparable(data[key]):
            changes.append(f"{key}: {_show(trained[key])} (checkpoint) vs {_show(data[key])} ({other})")
    return changes, unknown


def _comparable(value):
    """JSON-read settings compared as values: [8, 4, 4] equals [8.0, 4.0, 4.0] (to 1e-6 mm / HU)."""
    if isinstance(value, list | tuple):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return round(float(value), 6)
    return value


def _show(value) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value)


def read_weights(directory: str | Path, which: str = "best") -> dict[str, torch.Tensor]:
    name = f"{'best' if which == 'best' else 'model'}.safetensors"
    path = _file(directory, name)
    local = not storage.is_s3(path)
    data = None if local else _read(directory, name)
    if (local and not Path(path).exists()) or (not local and data is None):
        raise WeightsError(f"{directory} is not a molre checkpoint (no {name})")
    try:
        return load_file(path) if local else load_safetensors(data)  # a local file is memory-mapped
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
        raise WeightsError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None


# ---- what defines a run: its fingerprint ------------------------------------------------------------------


def run_fingerprint(cfg: RunConfig, dataset_sha256: str | None, train_order: str | None = None) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: the config less ``RESUMABLE_KEYS``,
    the sha256 of the dataset's manifest (which lists every shard's sha256) and the train order that
    ``train.cache_train_gb`` decided (``dataset.train_order``); ``sha256`` digests them."""
    body = {"config": _defining(config_to_dict(cfg)), "dataset_sha256": dataset_sha256}
    if train_order is not None:
        body["train_order"] = train_order
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    return {**body, "sha256": digest}


def read_fingerprint(directory: str | Path) -> dict | None:
    """The checkpoint's fingerprint; None for a checkpoint written before fingerprints existed."""
    path = _file(directory, FINGERPRINT)
    data = _read(directory, FINGERPRINT)
    if data is None:
        return None
    try:
        fingerprint = json.loads(data)
        if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("config"), dict):
            raise TypeError("no config mapping")
    except (ValueError, TypeError) as err:
        raise WeightsError(f"{path}: not a readable run fingerprint ({type(err).__name__})") from None
    return fingerprint


def fingerprint_changes(saved: dict, current: dict) -> list[str]:
    """``key: saved -> current`` for each defining config key that differs, and the dataset when both name one.
    Both configs are rebuilt first, so a key that this molre added (at its default) is no change."""
    configs = (as_written(json.loads(json.dumps(saved["config"]))), current["config"])  # a copy: completed
    before, after = (flat_dotted(config_to_dict(build_config(c))) for c in configs)
    changes = [
        f"{key}: {json.dumps(before.get(key))} -> {json.dumps(after.get(key))}"
        for key in sorted(before.keys() | after.keys())
        if key not in RESUMABLE_KEYS and before.get(key) != after.get(key)
    ]
    old, new = saved.get("dataset_sha256"), current.get("dataset_sha256")
    if old and new and old != new:
        changes.append(f"dataset: manifest sha256 {old[:12]}... -> {new[:12]}...")
    old, new = saved.get("train_order"), current.get("train_order")
    if old and new and old != new:  # a fingerprint from before train orders were recorded names none
        changes.append(f"train order: {old} -> {new} (train.cache_train_gb decides it; give the run's value)")
    return changes


def check_same_run(
    directory: str | Path, cfg: RunConfig, fingerprint: dict | None, name: str | None = None
) -> None:
    """Refuse to resume the checkpoint at ``directory`` under a run that another config or dataset defines.

    ``fingerprint``: this run's (``run_fingerprint``; None = its config only). ``name``: what messages call the
    checkpoint (its URI on storage, where ``directory`` is a local copy). A checkpoint without a fingerprint
    (written before them) is compared by its config.yaml and resumed with a warning: its dataset is unknown."""
    name = str(name or directory)
    current = fingerprint or run_fingerprint(cfg, None)
    saved = read_fingerprint(directory)
    if saved is None:
        log.warning(
            "run %s: checkpoint %s has no %s (written by an older molre): its config is compared but not its "
            "dataset; resuming it", cfg.train.run_name, name, FINGERPRINT,
        )  # fmt: skip
        saved = {"config": config_to_dict(read_config(directory)), "dataset_sha256": None}
    try:
        changes = fingerprint_changes(saved, current)
    except ConfigError as err:
        raise ConfigError(f"{_file(name, FINGERPRINT)}: its config does not fit this molre: {err}") from None
    if changes:
        run_dir = storage.join(cfg.train.storage, cfg.train.run_name)
        raise ConfigError(
            f"run {cfg.train.run_name!r}: its checkpoint {name} belongs to a run with another config or "
            f"dataset ({'; '.join(changes)}); resuming would continue that run (or report its result again if it "
            f"finished) instead of training this one. Pick another train.run_name, or delete the run folder "
            f"{run_dir} to start afresh"
        )


def checkpoint_uri(path: str | None, storage_root: str) -> str | None:
    """The URI of a checkpoint or run folder that Ray reports (``Checkpoint.path``, ``Result.path``): its path is
    inside the filesystem molre gave Ray for ``storage_root``, which for ``s3://bucket/prefix`` is
    ``bucket/prefix/...``, without the scheme; a local path is returned as it is."""
    if path is None or not storage.is_s3(storage_root) or storage.is_s3(path):
        return path
    scheme = str(storage_root).split("://", 1)[0]
    return f"{scheme}://{str(path).lstrip('/')}"


def _defining(tree: dict) -> dict:
    """A nested config dict without ``RESUMABLE_KEYS``."""
    out = json.loads(json.dumps(tree))
    for key in RESUMABLE_KEYS:
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part, {})
        node.pop(leaf, None)
    return out
