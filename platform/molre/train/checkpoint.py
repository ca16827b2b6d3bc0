"""Training checkpoints: what a worker saves each epoch and what ``evaluate`` / ``predict`` load.

A checkpoint directory holds
  model.safetensors   trained state of this epoch: trainable parameters (LoRA, MoLRE, pooling, head; all weights
                      if finetune=full) and persistent buffers (BatchNorm running statistics)
  best.safetensors    the same for the best validation epoch so far (what results report)
  optimizer.pt        AdamW state of this epoch
  state.json          epoch, best epoch and metric, epochs without gain, history of per-epoch metrics, finished
  config.yaml         the full run config (the frozen backbone is rebuilt from it: preset + weights URI)
  setup.json          data facts of the run: voxel spacing, grid, model input size, the preprocessing's
                      anti-aliasing and minimum slice count (predict prepares a series the same way)
  val_outputs.npz     validation scores / labels / known / mean routing weights of the best epoch
Frozen weights are not stored (they are rebuilt from the config), so a DINOv3-Base LoRA+MoLRE checkpoint is ~3 MB,
not 350 MB. Buffers are, since training changes them even under a frozen backbone: a BatchNorm in train mode
updates its running statistics (DeepCNTD: 264 buffers, 52,200 numbers; the ViT presets have none).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from molre.config import RunConfig, build_config, config_to_dict, read_yaml
from molre.data.ingest import DEFAULT_MIN_SLICES
from molre.errors import WeightsError

SETUP_FACTS = ("grid", "spacing", "input_size", "antialias", "min_slices")


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
    if val_outputs is not None:
        np.savez_compressed(d / "val_outputs.npz", **val_outputs)


def read_state(directory: str | Path) -> TrainState:
    path = Path(directory) / "state.json"
    try:
        return TrainState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise WeightsError(f"{path}: not a readable training state ({type(err).__name__})") from None


def read_config(directory: str | Path) -> RunConfig:
    path = Path(directory) / "config.yaml"
    if not path.exists():
        raise WeightsError(f"{directory} is not a molre checkpoint (no config.yaml)")
    raw = read_yaml(path)
    molre = (raw.get("adapter") or {}).get("molre")
    if isinstance(molre, dict) and molre.get("placement") == "blocks" and "route_by" not in molre:
        molre["route_by"] = "token"  # written before route_by existed: blocks placement routed every token
    return build_config(raw, source=str(path))


def read_setup(directory: str | Path) -> dict:
    """The run's data facts (``preprocessing_facts`` gives the ones a checkpoint from before them lacks)."""
    path = Path(directory) / "setup.json"
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable molre setup ({type(err).__name__})") from None
    return {**facts, **preprocessing_facts(facts)}


def preprocessing_facts(config: dict) -> dict:
    """What ``predict`` must repeat of the data's preprocessing, from a manifest's config (or a checkpoint's
    setup.json): one written before ``antialias`` existed was made without it, with the default minimum."""
    return {"antialias": bool(config.get("antialias", False)),
            "min_slices": int(config.get("min_slices", DEFAULT_MIN_SLICES))}  # fmt: skip


def read_weights(directory: str | Path, which: str = "best") -> dict[str, torch.Tensor]:
    path = Path(directory) / f"{'best' if which == 'best' else 'model'}.safetensors"
    if not path.exists():
        raise WeightsError(f"{directory} is not a molre checkpoint (no {path.name})")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
        raise WeightsError(f"{path}: not a readable safetensors file ({type(err).__name__})") from None
