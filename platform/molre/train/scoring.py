"""A checkpoint's model as `molre evaluate` and `molre predict` load and score it.

``load_checkpoint_model``: the classifier rebuilt from the checkpoint's config, its frozen weights checked
against the digest the run recorded (``check_frozen``) and its best trained weights loaded, with both digests
(``model_identity``: what a thresholds.json is matched to). ``score_volumes``: probabilities scored as the
run's validation scored them on the device used (bf16 autocast for a bf16 run). ``resolve_checkpoint``: a run
folder -> its latest checkpoint. The checkpoint may be a local path or an ``s3://`` URI.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

import torch

from molre.config import RunConfig
from molre.data import storage
from molre.data.augment import augment_batch
from molre.errors import DataError, MolreError, WeightsError
from molre.models import MoLREClassifier, build_model
from molre.models.runtime import uses_bf16
from molre.train.checkpoint import (
    FROZEN_SHA256,
    check_frozen,
    frozen_digest,
    load_trained_state,
    read_config,
    read_setup,
    read_weights,
    tensors_digest,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


TRAINED_SHA256 = "trained_sha256"  # load_checkpoint_model's setup: trained_digest of the best weights loaded


def load_checkpoint_model(checkpoint: str, device: str = "cpu", preset: str | None = None):
    """The classifier of a checkpoint with its best weights, in eval mode, plus its config and data facts
    (setup.json's, and ``trained_sha256``: ``trained_digest`` of the weights loaded; see ``model_identity``)."""
    cfg = read_config(checkpoint)
    if preset and preset != cfg.backbone.preset:
        raise WeightsError(f"checkpoint {checkpoint} holds preset {cfg.backbone.preset}, not {preset}")
    torch.manual_seed(
        cfg.train.seed
    )  # the frozen backbone is rebuilt as in training when it has no weights file
    model = build_model(cfg)
    setup = read_setup(checkpoint)
    check_frozen(frozen_digest(model), setup, checkpoint, cfg.backbone.weights)
    state = read_weights(checkpoint, "best")
    load_trained_state(model, state, checkpoint)
    # hashed here, from the tensors already read: no second read of best.safetensors (S3); ~3 MB for LoRA
    setup[TRAINED_SHA256] = trained_digest(state)
    return model.to(device).eval(), cfg, setup


def trained_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a checkpoint's trained tensors (best.safetensors as read) by name, dtype, shape and bytes, as
    ``frozen_digest`` digests the frozen ones. Of the tensors, not of the file: a checkpoint copied, moved or
    saved again with the same best weights (each later epoch of a run rewrites best.safetensors, possibly
    under another safetensors version) keeps it; any training step changes it."""
    return tensors_digest(state)


def model_identity(setup: dict) -> dict:
    """``operating_points.MODEL_KEYS`` of a loaded checkpoint (``load_checkpoint_model``'s setup): what
    thresholds.json records of the model whose scores its thresholds are, and ``--thresholds`` compares."""
    return {"trained_sha256": setup[TRAINED_SHA256], "frozen_sha256": setup.get(FROZEN_SHA256)}


@torch.no_grad()
def score_volumes(model: MoLREClassifier, cfg: RunConfig, setup: dict, hu: torch.Tensor) -> torch.Tensor:
    """Probabilities [B, C] of int16 HU volumes [B, grid], scored as the run's validation scores them
    (``loop.score_shard``): under ``loop.autocast``, i.e. bf16 autocast for ``train.precision`` bf16 (or auto
    on CUDA) on the model's device, else fp32. Validation's frozen weights are stored in bf16 under bf16
    autocast (``prepare_runtime``); autocast rounds the fp32 ones here to the same bits at each use, so the
    scores are validation's (~2e-3 from fp32 ones for a bf16 run)."""
    from molre.train.loop import autocast  # imports ray.train (~1 s): not for `molre predict --help`

    device = next(model.parameters()).device
    x = augment_batch(hu, cfg.data, torch.Generator(), train=False, out_size=tuple(setup["input_size"]))
    with autocast(cfg, device):
        return torch.sigmoid(model(x.to(device)).float())


def preprocessing_verdict(
    changes: list[str], unknown: dict[str, str], allow: bool, logger: logging.Logger, *,
    not_compared: str, refused: tuple[str, str], allowed: str,
) -> dict:  # fmt: skip
    """What evaluate and predict do with ``checkpoint.preprocessing_changes``' verdict on a checkpoint's
    preprocessing against the inputs they score, in their own words: settings not compared (``unknown``,
    recorded on one side only: an older checkpoint) are the warning ``not_compared``, followed by them;
    differences (``changes``) are a DataError ``refused`` (its file, its reason), or with ``allow`` the warning
    ``allowed``. Returns what their outputs record (summary.json's and each prediction's ``preprocessing``)."""
    if unknown:
        logger.warning("%s: %s", not_compared, "; ".join(f"{key} ({why})" for key, why in unknown.items()))
    if changes and not allow:
        raise DataError(*refused)
    if changes:
        logger.warning("%s", allowed)
    return {"mismatches": changes, "not_compared": unknown, "mismatch_allowed": bool(allow)}


def scoring_precision(cfg: RunConfig, device: str | torch.device) -> str:
    """What ``score_volumes`` scores in on ``device``: "bf16" (autocast) or "fp32" (recorded in the outputs)."""
    return "bf16" if uses_bf16(cfg.train.precision, device) else "fp32"


def resolve_checkpoint(checkpoint: str) -> tuple[str, str | None]:
    """The checkpoint folder to load for ``checkpoint``, and a line saying which one was picked when it is not
    ``checkpoint`` itself: a run folder (``<train.storage>/<train.run_name>``, holding Ray Train's snapshot)
    gives its latest checkpoint, the one a re-run would resume (``molre.train.run.latest_checkpoint``), whose
    best.safetensors holds the run's best epoch so far. A file is refused: the checkpoint is a folder."""
    checkpoint = str(checkpoint)
    if not storage.exists(checkpoint):
        return checkpoint, None  # load_checkpoint_model says it is missing
    if not storage.is_dir(checkpoint):
        raise WeightsError(
            f"{checkpoint} is a file; give the checkpoint folder (the one holding config.yaml and "
            "best.safetensors) or the run folder"
        )
    if storage.exists(storage.join(checkpoint, "config.yaml")):
        return checkpoint, None
    from molre.config import build_config
    from molre.train.checkpoint import read_state
    from molre.train.loop import METRIC
    from molre.train.run import RAY_SNAPSHOT, latest_checkpoint

    if storage.exists(storage.join(checkpoint, RAY_SNAPSHOT)):
        parent, _, name = checkpoint.rstrip("/").rpartition("/")
        ray_train_log = logging.getLogger("ray.train")
        level = ray_train_log.level
        ray_train_log.setLevel(logging.WARNING)  # not its INFO on restoring a run, which speaks of training
        try:
            latest = latest_checkpoint(build_config({"train": {"storage": parent or ".", "run_name": name}}))
        except MolreError:
            raise
        except Exception as err:  # Ray's reader of its snapshot: another Ray version's, a damaged file
            raise WeightsError(
                f"run folder {checkpoint}: its Ray Train snapshot cannot be read ({type(err).__name__}); give "
                "one of its checkpoint folders"
            ) from None
        finally:
            ray_train_log.setLevel(level)
        if latest is None:
            raise WeightsError(f"run folder {checkpoint} holds no checkpoint yet")
        # named under the folder as given (Ray reports a local path made absolute)
        picked = storage.join(checkpoint, latest.rstrip("/").rpartition("/")[2])
        state = read_state(picked)
        status = "finished" if state.finished else "not finished"
        return picked, (
            f"{checkpoint} is a run folder: using its latest checkpoint {picked} (epoch {state.epoch}, "
            f"{status}; its best weights: epoch {state.best_epoch}, {METRIC} {state.best_metric:.4f})"
        )
    return checkpoint, None  # load_checkpoint_model says it is no checkpoint


def announced(args) -> str:
    """The checkpoint folder ``args.checkpoint`` names (``resolve_checkpoint``), its pick printed before the
    scoring starts (the functions log it, which the CLI does not show; resolving once, here, keeps what is
    printed and what is loaded the same while a run writes new checkpoints)."""
    checkpoint, picked = resolve_checkpoint(args.checkpoint)
    if picked:
        print(f"molre {args.command}: {picked}", file=sys.stderr)
    return checkpoint


def add_checkpoint_arguments(parser) -> None:
    """The arguments `molre evaluate` and `molre predict` share: the checkpoint and the device."""
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory written by molre train (local path or s3://), or a run folder "
        "(<train.storage>/<run_name>: its latest checkpoint)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
