"""`molre evaluate` and `molre predict`: score a checkpoint's best weights on a split, or on one series.

evaluate: per-finding AUCs and calibration (Parquet + Markdown), mean +- std and stratified counts, as
``summary.json`` with the provenance (checkpoint, data and its manifest's sha256, split, molre version,
precision, the model's digests), and each study's scores; optionally an operating point chosen on another
split (thresholds.json; the arithmetic: ``molre.train.operating_points``) or one a thresholds.json gives
(``--thresholds``: chosen for the same model, on other data); refuses data preprocessed unlike the
checkpoint's training data.
predict: per study (one, or a batch with the model loaded once) the 75 probabilities, the routing weights and
attention weight of each slice, what was scored (series, slices, spacing, skipped files) and by which model,
and with ``--thresholds`` each finding's flag at the file's thresholds; refuses a checkpoint trained on data
preprocessed unlike this molre prepares a study.
Both take a checkpoint folder or a run folder (its latest checkpoint) and score as the run's validation did on
the device used (bf16 autocast for a bf16 run: ``score_volumes``).
Both run in-process on one device (no cluster needed) and read shards with pyarrow. The checkpoint, the data and
evaluate's output folder may each be a local path or an ``s3://`` URI (read and written through
``molre.data.storage``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch

from molre import __version__
from molre.config import RunConfig
from molre.data import shards, storage
from molre.data.augment import augment_batch
from molre.errors import ConfigError, DataError, MolreError, WeightsError
from molre.findings import FINDING_IDS, FINDINGS
from molre.models import MoLREClassifier, build_model
from molre.models.runtime import uses_bf16
from molre.train import operating_points as op
from molre.train.checkpoint import (
    FROZEN_SHA256,
    RECORDED_AS_IS,
    check_frozen,
    frozen_digest,
    load_trained_state,
    preprocessing_changes,
    read_config,
    read_fingerprint,
    read_setup,
    read_weights,
)
from molre.train.metrics import per_finding_auc, summarize

if TYPE_CHECKING:
    from molre.data.ingest import SeriesRef, Volume

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
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def model_identity(setup: dict) -> dict:
    """``operating_points.MODEL_KEYS`` of a loaded checkpoint (``load_checkpoint_model``'s setup): what
    thresholds.json records of the model whose scores its thresholds are, and ``--thresholds`` compares."""
    return {"trained_sha256": setup[TRAINED_SHA256], "frozen_sha256": setup.get(FROZEN_SHA256)}


def _iter_split(root: str, split: str, batch_size: int, manifest: shards.Manifest | None = None):
    manifest = manifest or shards.read_manifest(root)
    for uri in shards.list_shards(root, split, manifest):
        table = shards.read_shard(uri, verify=True)  # checksum + schema: a corrupt shard is never scored
        for batch in table.to_batches(max_chunksize=batch_size):
            yield batch.to_pydict()


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


def scoring_precision(cfg: RunConfig, device: str | torch.device) -> str:
    """What ``score_volumes`` scores in on ``device``: "bf16" (autocast) or "fp32" (recorded in the outputs)."""
    return "bf16" if uses_bf16(cfg.train.precision, device) else "fp32"


def evaluate(
    checkpoint: str,
    data: str,
    split: str = "test",
    out_dir: str | None = None,
    device: str = "cpu",
    *,
    allow_preprocessing_mismatch: bool = False,
    bootstrap: int = 0,
    operating_point: str | None = None,
    threshold_split: str | None = None,
    allow_thresholds_on_evaluated_split: bool = False,
    thresholds: str | None = None,
) -> dict:
    """Score the checkpoint's best weights on ``split`` of the shards at ``data``; write per_finding_auc.parquet /
    .md, scores.parquet (one row per study) and summary.json (results + provenance) to ``out_dir`` (default
    ``CHECKPOINT/eval-SPLIT-<manifest sha256[:12]>``: one folder per dataset, rewritten by the same evaluation).
    Each finding's AUC and its calibration (Brier score, ECE over 10 equal-width bins: ``operating_points``).

    ``checkpoint``: a checkpoint folder, or a run folder, which gives its latest checkpoint
    (``resolve_checkpoint``; the pick is logged, and summary.json records both as ``checkpoint_given`` and
    ``checkpoint``). Scores as the run's validation did on ``device`` (``score_volumes``; summary.json:
    ``precision``). Data preprocessed unlike the checkpoint's training data is a DataError, or with
    ``allow_preprocessing_mismatch`` a warning recorded in summary.json. ``bootstrap``: study-level resamples
    for 95% CIs (0: none).

    ``operating_point`` (``sensitivity=T``, ``specificity=T`` or ``youden``): per finding a threshold
    chosen by that rule on ``threshold_split`` (default val for a test split; the evaluated split itself
    only with ``allow_thresholds_on_evaluated_split``, as it inflates the results), applied to ``split``:
    TP / FP / TN / FN, sensitivity, specificity, PPV and NPV (with ``bootstrap``, CIs of the two rates);
    the thresholds also go to thresholds.json (``operating_plan``), with the model's digests.

    ``thresholds`` (a thresholds.json, local or s3://; instead of ``operating_point``): apply the file's
    thresholds as they are, e.g. to another hospital's data, which may have no val split. The file must have
    been written for this model (``operating_points.check_thresholds_model``); one chosen on this very split of
    this very data needs ``allow_thresholds_on_evaluated_split``. summary.json's ``operating_point`` records
    the file and its sha256 (``threshold_plan``)."""
    plan = threshold_plan(
        operating_point, threshold_split, thresholds, split, allow_thresholds_on_evaluated_split
    )
    resolved, picked = resolve_checkpoint(checkpoint)
    if picked:
        log.info("evaluate: %s", picked)
    return _evaluate(str(checkpoint), resolved, data, split, out_dir, device,
                     allow_preprocessing_mismatch, bootstrap, plan)  # fmt: skip


class OperatingPlan(NamedTuple):
    """Which operating point evaluate reports, and where its thresholds are chosen."""

    rule: op.OperatingRule
    split: str  # the split the thresholds are chosen on
    on_evaluated: bool  # that split is the evaluated one (allowed explicitly): optimistic results


class FixedPlan(NamedTuple):
    """Thresholds applied as a thresholds.json gives them (--thresholds), not chosen here."""

    thresholds: op.ThresholdsFile
    allow_evaluated: bool  # the file may hold thresholds chosen on the evaluated split of this very data
    on_evaluated: bool = False  # it does (set once the data's manifest is read): optimistic results
    verified: bool = False  # the file's model digests matched the checkpoint's (False: an older file)


SPLITS = ("train", "val", "test")


def threshold_plan(
    operating_point: str | None,
    threshold_split: str | None,
    thresholds: str | None,
    split: str,
    allow_evaluated: bool = False,
) -> OperatingPlan | FixedPlan | None:
    """``operating_plan``'s, or with ``thresholds`` the file read and checked (``read_thresholds``) before
    the data is: thresholds to apply (a FixedPlan). Giving both a file and an operating point or threshold
    split is a ConfigError: the file's thresholds were chosen elsewhere, by the rule it records."""
    if thresholds is None:
        return operating_plan(operating_point, threshold_split, split, allow_evaluated)
    if operating_point is not None or threshold_split:
        given = "--operating-point" if operating_point is not None else "--threshold-split"
        raise ConfigError(f"thresholds: {given} chooses thresholds, --thresholds applies those of a file "
                          f"({thresholds}); give one or the other")  # fmt: skip
    return FixedPlan(op.read_thresholds(thresholds), allow_evaluated)


def operating_plan(
    operating_point: str | None, threshold_split: str | None, split: str, allow_evaluated: bool = False
) -> OperatingPlan | None:
    """The operating point asked for (None: none), checked before anything is read: a bad rule, a threshold
    split without one, no threshold split for a split other than test (only test defaults to val), or the
    evaluated split itself without ``allow_evaluated`` (thresholds fitted to the data they are judged on:
    optimistic sensitivity / specificity) is a ConfigError."""
    if operating_point is None:
        if threshold_split or allow_evaluated:
            raise ConfigError("threshold split: given without an operating point (--operating-point "
                              "sensitivity=0.9, specificity=0.9 or youden)")  # fmt: skip
        return None
    rule = op.parse_rule(operating_point)
    chosen = threshold_split or ("val" if split == "test" else None)
    if chosen is None:
        raise ConfigError(f"threshold split: evaluating split '{split}', name the split to choose the "
                          "thresholds on (--threshold-split); only a test split defaults to val")  # fmt: skip
    if chosen not in SPLITS:
        raise ConfigError(f"threshold split: '{chosen}' is none of {', '.join(SPLITS)}")
    if chosen == split and not allow_evaluated:
        raise ConfigError(
            f"threshold split: choosing the thresholds on the evaluated split '{split}' fits them to the "
            "data they are judged on and inflates the reported sensitivity / specificity; choose them on "
            "another split (--threshold-split val), or pass --allow-thresholds-on-evaluated-split to do it "
            "anyway"
        )
    return OperatingPlan(rule, chosen, chosen == split)


def _evaluate(
    given: str,
    checkpoint: str,
    data: str,
    split: str,
    out_dir: str | None,
    device: str,
    allow: bool,
    bootstrap: int,
    plan: OperatingPlan | FixedPlan | None = None,
) -> dict:
    """``evaluate`` of the checkpoint folder ``checkpoint`` that ``given`` resolved to (the CLI resolves it
    itself, to print the pick before scoring); ``plan``: ``threshold_plan``'s."""
    if bootstrap < 0:
        raise ConfigError(f"bootstrap: {bootstrap} resamples; give 0 (no CIs) or more")
    manifest, manifest_sha256 = shards.read_manifest_and_sha256(data)
    if isinstance(plan, OperatingPlan) and not shards.list_shards(data, plan.split, manifest):
        raise ConfigError(f"threshold split: split '{plan.split}' of {data} holds no studies to choose the "
                          "thresholds on; name another (--threshold-split)")  # fmt: skip
    if isinstance(plan, FixedPlan):
        plan = plan._replace(on_evaluated=_chosen_here(plan, manifest_sha256, split))
    preprocessing = _check_preprocessing(checkpoint, data, manifest.config, allow)
    fingerprint = read_fingerprint(checkpoint) or {}  # None: a checkpoint from before fingerprints
    model, cfg, setup = load_checkpoint_model(checkpoint, device)
    provenance = {
        "checkpoint": checkpoint, "checkpoint_given": given, "data": str(data), "split": split,
        "manifest_sha256": manifest_sha256, "training_dataset_sha256": fingerprint.get("dataset_sha256"),
        "molre_version": __version__, "device": str(device), "precision": scoring_precision(cfg, device),
        **model_identity(setup), "preprocessing": preprocessing,
    }  # fmt: skip
    if isinstance(plan, FixedPlan):  # before scoring: thresholds of another model are refused at once
        identity, precision = model_identity(setup), provenance["precision"]
        plan = plan._replace(
            verified=op.check_thresholds_model(plan.thresholds, identity, checkpoint, precision)
        )
    ids, scores, labels, known = _score_split(model, cfg, setup, data, split, manifest)
    evaluated = (scores, labels, known)
    aucs = per_finding_auc(scores, labels, known)
    summary = summarize(aucs)
    table = _per_finding_table(aucs, labels, known)
    result = {**summary.as_dict(), "undefined": summary.undefined, "volumes": len(scores)}
    if bootstrap:
        low, high, mean_ci = bootstrap_auc_ci(scores, labels, known, bootstrap)
        table["auc_ci_low"], table["auc_ci_high"] = low, high
        result |= {"mean_auc_ci": mean_ci, "bootstrap": {"resamples": bootstrap, "unit": "study", "level": 0.95,
                                                          "seed": 0}}  # fmt: skip
    result |= _add_calibration(table, *evaluated)
    thresholds = None
    if isinstance(plan, OperatingPlan):
        # each split scored once: the evaluated one's scores serve when the thresholds are chosen on it
        chosen_on = evaluated if plan.on_evaluated else _score_split(model, cfg, setup, data, plan.split,
                                                                     manifest)[1:]  # fmt: skip
        thresholds = _add_operating_point(table, result, plan, chosen_on, evaluated, bootstrap)
    elif plan:  # the file's thresholds: not written again (thresholds.json stays the file of their choice)
        _add_fixed_point(table, result, plan, evaluated, bootstrap)
    result |= provenance
    out = str(out_dir or storage.join(checkpoint, f"eval-{split}-{manifest_sha256[:12]}"))
    files = [
        ("per_finding_auc.parquet", _parquet(table)),
        ("per_finding_auc.md", _markdown(table, summary, result).encode()),
        ("scores.parquet", _scores_parquet(ids, scores, labels, known)),
        ("summary.json", _json_bytes(result)),
    ]
    if thresholds:
        files.append(("thresholds.json", _json_bytes(_thresholds_file(thresholds, result))))
    for name, blob in files:
        storage.write_bytes(storage.join(out, name), blob)
    return {**result, "out_dir": out}


def _json_bytes(value: dict) -> bytes:
    return json.dumps(_json_safe(value), indent=1, allow_nan=False).encode()


def _add_calibration(table: pd.DataFrame, scores, labels, known) -> dict:
    """Each finding's Brier score and ECE as table columns ``brier`` / ``ece``; their means over the findings
    with a known label, for summary.json."""
    table["brier"] = op.brier_scores(scores, labels, known)
    table["ece"] = op.expected_calibration_error(scores, labels, known)
    return {"mean_brier": op.nan_mean(table["brier"]), "mean_ece": op.nan_mean(table["ece"]),
            "calibration": {"findings": int(table["brier"].notna().sum()), "ece_bins": op.ECE_BINS,
                            "ece_binning": "equal-width on [0, 1], floor(10 * score)"}}  # fmt: skip


DECISION = "positive when score >= threshold"  # operating_points' rule; predict's flags apply it too


def _add_operating_point(table: pd.DataFrame, result: dict, plan: OperatingPlan, chosen_on: tuple,
                         evaluated: tuple, bootstrap: int) -> dict:  # fmt: skip
    """Thresholds chosen by ``plan`` on ``chosen_on`` (scores, labels, known of the threshold split), applied
    to ``evaluated`` (``_apply_thresholds``) as summary.json's ``operating_point``. Returns thresholds.json's
    per-finding records."""
    thresholds, reasons = op.choose_thresholds(*chosen_on, plan.rule, f"split {plan.split}")
    point = {
        "rule": str(plan.rule),
        "threshold_split": plan.split,
        "chosen_on_evaluated_split": plan.on_evaluated,
        "threshold_split_volumes": len(chosen_on[0]),
    }
    result["operating_point"] = point | _apply_thresholds(table, thresholds, reasons, evaluated, bootstrap)
    return _threshold_records(thresholds, reasons, chosen_on)


def _add_fixed_point(table: pd.DataFrame, result: dict, plan: FixedPlan, evaluated: tuple, bootstrap: int):
    """A thresholds file's thresholds applied to ``evaluated`` (``_apply_thresholds``) as summary.json's
    ``operating_point``, which records the file (its sha256) and where its thresholds were chosen."""
    fixed = plan.thresholds
    applied = _apply_thresholds(table, fixed.values, fixed.reasons, evaluated, bootstrap)
    result["operating_point"] = {**fixed.applied(), "chosen_on_evaluated_split": plan.on_evaluated,
                                 "model_verified": plan.verified, **applied}  # fmt: skip


def _apply_thresholds(table: pd.DataFrame, thresholds: np.ndarray, reasons: list, evaluated: tuple,
                      bootstrap: int) -> dict:  # fmt: skip
    """Thresholds [C] (NaN: none, for ``reasons``) applied to ``evaluated``: table columns threshold,
    threshold_reason, tp / fp / tn / fn (NA without a threshold), sensitivity, specificity, ppv, npv (+ the
    two rates' CIs with ``bootstrap``). Returns the operating point's decision rule, how many findings have a
    threshold, which have none, and the rates' means over the findings where each is defined (+ CIs)."""
    counts = op.confusion(*evaluated, thresholds)
    measured = op.rates(**counts)
    table["threshold"], table["threshold_reason"] = thresholds, reasons
    for name, column in counts.items():
        table[name] = pd.Series(column).astype("Int64").array
    for name, column in measured.items():
        table[name] = column
    point = {"decision": DECISION, "n_thresholds": int((~np.isnan(thresholds)).sum()),
             "no_threshold": [fid for fid, why in zip(FINDING_IDS, reasons, strict=True) if why]}  # fmt: skip
    point |= {f"mean_{name}": op.nan_mean(column) for name, column in measured.items()}
    if bootstrap:
        for name, (low, high, mean_ci) in op.bootstrap_rate_cis(*evaluated, thresholds, bootstrap).items():
            table[f"{name}_ci_low"], table[f"{name}_ci_high"] = low, high
            point[f"mean_{name}_ci"] = mean_ci
    return point


def _chosen_here(plan: FixedPlan, manifest_sha256: str, split: str) -> bool:
    """Whether the file's thresholds were chosen on the very studies evaluated now (the same split of data
    with the same manifest sha256): fitted to the studies they are judged on, they give optimistic results,
    so that is a ConfigError unless allowed, as for thresholds chosen in this run (``operating_plan``)."""
    doc = plan.thresholds.doc
    if doc.get("manifest_sha256") != manifest_sha256 or doc.get("split") != split:
        return False
    if not plan.allow_evaluated:
        raise ConfigError(
            f"thresholds: {plan.thresholds.uri} holds thresholds chosen on split '{split}' of this very data "
            f"(manifest sha256 {manifest_sha256[:12]}...): judging them on the studies they were fitted to "
            "inflates the reported sensitivity / specificity; evaluate another split, or pass "
            "--allow-thresholds-on-evaluated-split to do it anyway"
        )
    return True


def _threshold_records(thresholds: np.ndarray, reasons: list, chosen_on: tuple) -> dict:
    """{finding id: threshold (None: none), reason, and the threshold split's known positives / negatives
    and the sensitivity / specificity the threshold has there}."""
    scores, labels, known = chosen_on
    there = op.rates(**op.confusion(scores, labels, known, thresholds))
    k = known.astype(bool)
    positives, negatives = (k & labels.astype(bool)).sum(0), (k & ~labels.astype(bool)).sum(0)
    return {fid: {"threshold": None if np.isnan(thresholds[c]) else float(thresholds[c]),
                  "reason": reasons[c], "positives": int(positives[c]), "negatives": int(negatives[c]),
                  "sensitivity": float(there["sensitivity"][c]),
                  "specificity": float(there["specificity"][c])}
            for c, fid in enumerate(FINDING_IDS)}  # fmt: skip


THRESHOLDS_FORMAT = op.THRESHOLDS_FORMAT


def _thresholds_file(records: dict, result: dict) -> dict:
    """thresholds.json: the rule, the split the thresholds were chosen on and the scores' provenance
    (checkpoint, data and manifest, precision, the model's digests: ``model_identity``, which ``--thresholds``
    checks), then per finding id its record; a study is positive for a finding when its probability >= the
    finding's threshold (null: no threshold, see its reason)."""
    point = result["operating_point"]
    keys = ("checkpoint", "checkpoint_given", "data", "manifest_sha256", "training_dataset_sha256",
            "molre_version", "device", "precision", *op.MODEL_KEYS)  # fmt: skip
    return {"format": THRESHOLDS_FORMAT, "rule": point["rule"], "split": point["threshold_split"],
            "chosen_on_evaluated_split": point["chosen_on_evaluated_split"], "decision": point["decision"],
            **{key: result[key] for key in keys}, "thresholds": records}  # fmt: skip


def _check_preprocessing(checkpoint: str, data: str, config: dict, allow: bool) -> dict:
    """Compare the data's preprocessing (its manifest's ``config``) with the checkpoint's training data's: a
    difference is a DataError naming each setting, unless ``allow`` (then a warning). What summary.json records."""
    changes, unknown = preprocessing_changes(read_setup(checkpoint), config)
    if unknown:
        log.warning("evaluate: preprocessing settings not compared between checkpoint %s and %s: %s", checkpoint,
                    data, "; ".join(f"{key} ({why})" for key, why in unknown.items()))  # fmt: skip
    if changes and not allow:
        raise DataError(
            storage.join(str(data), shards.MANIFEST),
            f"preprocessed unlike the training data of checkpoint {checkpoint}: {'; '.join(changes)}. The model "
            "would score inputs it was not trained on; preprocess the data with the checkpoint's settings, or "
            "pass --allow-preprocessing-mismatch to evaluate anyway",
        )
    if changes:
        log.warning("evaluate: %s is preprocessed unlike checkpoint %s's training data (%s); evaluating anyway "
                    "(--allow-preprocessing-mismatch)", data, checkpoint, "; ".join(changes))  # fmt: skip
    return {"mismatches": changes, "not_compared": unknown, "mismatch_allowed": bool(allow)}


def _score_split(model, cfg: RunConfig, setup: dict, data: str, split: str, manifest: shards.Manifest):
    """({study_hash, patient_hash: [N]}, scores [N, C] float32, labels [N, C] uint8, known [N, C] uint8)."""
    ids, scores, labels, known = {"study_hash": [], "patient_hash": []}, [], [], []
    for batch in _iter_split(data, split, cfg.train.batch_size, manifest):
        volumes = [shards.decode_volume(v, s) for v, s in zip(batch["volume"], batch["shape"], strict=True)]
        scores.append(score_volumes(model, cfg, setup, torch.from_numpy(np.stack(volumes))).cpu().numpy())
        labels.append(np.asarray(batch["labels"], dtype=np.uint8))
        known.append(np.asarray(batch["known"], dtype=np.uint8))
        for key, column in ids.items():
            column.extend(batch[key])
    if not scores:
        raise WeightsError(f"split '{split}' of {data} has no volumes to evaluate")
    return ids, *(np.concatenate(parts) for parts in (scores, labels, known))


def _per_finding_table(aucs: np.ndarray, labels: np.ndarray, known: np.ndarray) -> pd.DataFrame:
    """One row per finding: its AUC and the studies behind it (known = positives + negatives; unknown: neither)."""
    n_known, positives = known.astype(bool).sum(0), (known.astype(bool) & labels.astype(bool)).sum(0)
    return pd.DataFrame({
        "finding": FINDING_IDS, "name": [f.name for f in FINDINGS], "category": [f.category for f in FINDINGS],
        "auc": aucs, "n_known": n_known, "positives": positives, "n_negative": n_known - positives,
    })  # fmt: skip


def _parquet(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    return buffer.getvalue()


def _scores_parquet(ids: dict, scores: np.ndarray, labels: np.ndarray, known: np.ndarray) -> bytes:
    """scores.parquet: per study its hashes and the 75 scores / labels / known flags in ``FINDING_IDS`` order (the
    order is also in the file's metadata), for calibration, operating points or one's own statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def per_study(matrix: np.ndarray, kind) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), kind), matrix.shape[1])

    table = pa.table(
        {**{key: pa.array(column, pa.string()) for key, column in ids.items()},
         "scores": per_study(scores.astype(np.float32), pa.float32()),
         "labels": per_study(labels, pa.uint8()), "known": per_study(known, pa.uint8())},
        metadata={"molre.finding_ids": ",".join(FINDING_IDS)},
    )  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def bootstrap_auc_ci(
    scores: np.ndarray, labels: np.ndarray, known: np.ndarray, n_boot: int, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
    """Percentile CIs of each finding's AUC and of the mean AUC, resampling the studies with replacement
    ``n_boot`` times (seeded: the same CIs on a re-run); one resample serves every finding, so the mean's CI
    carries their correlation. A finding without both classes in a resample is left out of that resample; the
    mean is over the findings defined on the whole split (NaN / None where there is none).

    ``tune.leaderboard.bootstrap_ci`` resamples findings (the unit of a sweep comparison); here the study is the
    unit and each resample needs every AUC recomputed, done as a weighted Mann-Whitney count (``_weighted_auc``)."""
    columns = range(scores.shape[1])
    boot = np.concatenate([  # [n_boot, C]; the draws: [256, N] counts at a time (``study_resamples``)
        np.stack([_weighted_auc(scores[:, k], labels[:, k], known[:, k], counts) for k in columns], axis=1)
        for counts in op.study_resamples(len(scores), n_boot, seed)
    ])  # fmt: skip
    return op.percentile_cis(boot, per_finding_auc(scores, labels, known), level)


def _weighted_auc(score: np.ndarray, label: np.ndarray, known: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B] ROC AUCs of one finding, one per row of ``counts`` [B, N] (how often each study is drawn): the
    Mann-Whitney statistic P(s+ > s-) + P(s+ = s-) / 2, with each study counted ``counts`` times (what
    ``roc_auc_score`` gives on the repeated rows). NaN where a resample lacks a class."""
    keep = known.astype(bool)
    score, positive, counts = score[keep], label[keep].astype(bool), counts[:, keep]
    order = np.argsort(score[~positive], kind="stable")
    negatives = score[~positive][order]
    cum = np.zeros((len(counts), negatives.size + 1))  # cum[:, j]: drawn negatives among the j lowest
    np.cumsum(counts[:, ~positive][:, order], axis=1, out=cum[:, 1:])
    # per positive: negatives below it, and below or tied; their mean counts a tie as half
    below = cum[:, np.searchsorted(negatives, score[positive], "left")]
    not_above = cum[:, np.searchsorted(negatives, score[positive], "right")]
    drawn = counts[:, positive]
    n_pos, n_neg = drawn.sum(1), cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (drawn * (below + not_above) / 2).sum(1) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def _json_safe(value):
    """``value`` with every NaN / infinity as None: strict JSON (an undefined mean AUC is null, not NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _markdown(table: pd.DataFrame, summary, result: dict) -> str:
    lines = _markdown_header(summary, result) + _markdown_auc_table(table)
    if "operating_point" in result:
        lines += _markdown_operating_point(table, result["operating_point"], result["split"])
    return "\n".join(lines) + "\n"


def _markdown_header(summary, result: dict) -> list[str]:
    ci = result.get("mean_auc_ci")
    interval = f" (95% CI {ci[0]:.3f}-{ci[1]:.3f}, study bootstrap)" if ci else ""
    given = result["checkpoint_given"]
    picked = f" (the latest of run folder `{given}`)" if given != result["checkpoint"] else ""
    lines = [
        f"# Per-finding AUC ({result['split']})",
        "",
        f"Checkpoint `{result['checkpoint']}`{picked} on `{result['data']}` (manifest sha256 "
        f"{result['manifest_sha256'][:12]}...), {result['volumes']} studies; scored in {result['precision']} "
        f"on {result['device']}; molre {result['molre_version']}.",
        "",
        f"Mean AUC {summary.mean:.3f} +- {summary.std:.3f}{interval} over {summary.n_defined} findings with both "
        f"classes; AUC >= 0.90: {summary.n_high}; 0.80-0.90: {summary.n_moderate}; "
        f"undefined: {len(summary.undefined)}.",
        "",
        f"Calibration over the {result['calibration']['findings']} findings with known labels: mean Brier "
        f"score {_num(result['mean_brier'], 4)}, mean ECE {_num(result['mean_ece'], 4)} ({op.ECE_BINS} "
        "equal-width score bins).",
    ]
    if result["preprocessing"]["mismatches"]:
        changes = "; ".join(result["preprocessing"]["mismatches"])
        lines += ["", f"**Preprocessed unlike the training data** ({changes}); evaluated anyway."]
    return lines


def _markdown_auc_table(table: pd.DataFrame) -> list[str]:
    with_ci = "auc_ci_low" in table
    lines = [
        "",
        "| finding | category | known | positives | negatives | AUC |" + (" 95% CI |" if with_ci else "")
        + " Brier | ECE |",
        "|---|---|---:|---:|---:|---:|" + ("---:|" if with_ci else "") + "---:|---:|",
    ]  # fmt: skip
    for row in table.itertuples():
        auc = "undefined" if np.isnan(row.auc) else f"{row.auc:.3f}"
        cells = [row.name, row.category, int(row.n_known), int(row.positives), int(row.n_negative), auc]
        if with_ci:
            cells.append("-" if np.isnan(row.auc_ci_low) else f"{row.auc_ci_low:.3f}-{row.auc_ci_high:.3f}")
        cells += [_num(row.brier, 4), _num(row.ece, 4)]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def _markdown_operating_point(table: pd.DataFrame, point: dict, split: str) -> list[str]:
    """The operating point's section: what was chosen where, the means, and one row per finding."""
    means = ", ".join(f"{label} {_num(point[f'mean_{name}'])}{_ci(point.get(f'mean_{name}_ci'))}"
                      for name, label in RATES)  # fmt: skip
    lines = [
        "",
        f"## Operating point {point['rule']}: {_threshold_origin(point)}, results on {split}",
        "",
        f"A study is positive for a finding when its score >= the finding's threshold. Means over the "
        f"findings where each is defined: {means}. {point['n_thresholds']} findings have a threshold; "
        f"{len(point['no_threshold'])} none (the reason is in the table).",
    ]
    if point["chosen_on_evaluated_split"]:
        lines += ["", "**Thresholds chosen on the evaluated split itself**: the results are optimistic."]
    if point.get("model_verified") is False:
        lines += ["", "**The thresholds file records no model digest** (an older molre): not checked to belong "
                      f"to this checkpoint; it names checkpoint `{point['threshold_checkpoint']}`."]  # fmt: skip
    lines += ["", "| finding | threshold | TP | FP | TN | FN | sensitivity | specificity | PPV | NPV |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in table.to_dict("records"):
        if np.isnan(row["threshold"]):
            lines.append(f"| {row['name']} | none: {row['threshold_reason']} |" + " - |" * 8)
            continue
        cells = [row["name"], f"{row['threshold']:.4g}", *(int(row[c]) for c in ("tp", "fp", "tn", "fn"))]
        cells += [_num(row[name]) + _ci(_row_ci(row, name)) for name, _ in RATES]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


RATES = (("sensitivity", "sensitivity"), ("specificity", "specificity"), ("ppv", "PPV"), ("npv", "NPV"))


def _threshold_origin(point: dict) -> str:
    """Where the operating point's thresholds come from: chosen in this run, or a file's (--thresholds)."""
    if "thresholds_file" not in point:
        return f"thresholds chosen on {point['threshold_split']} ({point['threshold_split_volumes']} studies)"
    return (f"thresholds from `{point['thresholds_file']}` (sha256 {point['thresholds_sha256'][:12]}...), "
            f"chosen on {point['threshold_split']} of `{point['threshold_data']}`")  # fmt: skip


def _row_ci(row: dict, name: str) -> list[float] | None:
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return None if low is None or np.isnan(low) else [low, high]


def _num(value, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


# ---- predict ----------------------------------------------------------------------------------------------


def predict(
    checkpoint: str,
    series: str,
    device: str = "cpu",
    *,
    allow_preprocessing_mismatch: bool = False,
    thresholds: str | None = None,
) -> dict:
    """The prediction of one study (``predict_studies``); an input that cannot be scored is a DataError."""
    return next(predict_studies(checkpoint, [series], device, keep_going=False, thresholds=thresholds,
                                allow_preprocessing_mismatch=allow_preprocessing_mismatch))  # fmt: skip


def predict_studies(
    checkpoint: str,
    inputs: Sequence[str],
    device: str = "cpu",
    keep_going: bool = True,
    *,
    allow_preprocessing_mismatch: bool = False,
    thresholds: str | None = None,
) -> Iterator[dict]:
    """One prediction per input, the model loaded once. An input is one study on local disk: a DICOM series
    folder (or one of its files), a study folder (its series with the most slices that loads, as preprocess
    picks) or a NIfTI file. ``checkpoint``: a checkpoint folder, or a run folder (``resolve_checkpoint``).

    Each prediction holds
      input            ``path`` as given; ``series``: the series scored, relative to that folder (to a given
                       file's folder), "." for the folder itself; ``kind``; ``slices`` read; ``spacing_mm``:
                       its native voxel size (z, y, x) before alignment
      model            checkpoint folder, preset, adapter (MoLRE placement, route_by, experts), the grid and
                       spacing the model was trained on, molre version, ``precision`` scored in (bf16 / fp32,
                       as the run's validation on this device: ``score_volumes``) and ``preprocessing``: the
                       checkpoint's recorded settings against this molre's (``_check_study_preprocessing``)
      findings         id, name and category of each finding, in output order
      probabilities    {finding id: probability}
      flags            with ``thresholds`` only: {finding id: probability >= the file's threshold, or null
                       where the file has none}
      slice_z_mm       2D backbones: index i of ``slice_attention`` and of each ``router_weights`` row is the
                       i-th slice the model saw, inferior to superior; its centre in mm above the centre of
                       the aligned grid (``model_slice_z_mm``), not an input slice. null for 3D backbones.
      slice_attention  the attention pooling's weight of each slice (2D; null for 3D)
      router_weights   MoLRE's gates of the scored study: on slice features (placement=features), one row of K
                       per slice (2D) or one K-vector (3D); inside the backbone (placement=blocks,
                       route_by=slice) ``{module name: rows}`` likewise, one entry per adapted linear; null
                       without MoLRE and for route_by=token, whose gates are per token and not reported
      skipped_files    unreadable files in the scored series' folder(s), left out of it (name, reason)
    With ``keep_going``, an input that cannot be scored gives ``{"input": {"path"}, "model", "error": {"file",
    "reason"}}`` and the next one is scored; otherwise its error is raised. A checkpoint trained on data
    preprocessed unlike this molre prepares a study is a DataError (before any input is read), or with
    ``allow_preprocessing_mismatch`` a warning recorded in ``model.preprocessing``.

    ``thresholds``: a thresholds.json (local or s3://) written for this checkpoint's model by ``molre evaluate
    --operating-point`` (another model's is a ConfigError before any input is read:
    ``operating_points.check_thresholds_model``); ``model.operating_point`` records its rule, split, file and
    sha256. Without it the output has neither ``flags`` nor ``model.operating_point``.
    """
    checkpoint, picked = resolve_checkpoint(checkpoint)
    if picked:
        log.info("predict: %s", picked)
    fixed = op.read_thresholds(thresholds) if thresholds else None  # a bad file fails before the model loads
    model, cfg, setup = load_checkpoint_model(checkpoint, device)
    preprocessing = _check_study_preprocessing(checkpoint, setup, allow_preprocessing_mismatch)
    facts = {**_model_facts(checkpoint, cfg, setup), "precision": scoring_precision(cfg, device),
             "preprocessing": preprocessing}  # fmt: skip
    if fixed:
        facts["operating_point"] = _predict_operating_point(fixed, checkpoint, setup, facts["precision"])
    for path in inputs:
        try:
            yield _predict_study(model, cfg, setup, facts, str(path), fixed)
        except (MolreError, OSError, ValueError) as err:
            if not keep_going:
                raise
            file, reason = (err.path, err.reason) if isinstance(err, DataError) else (str(path), _reason(err))
            yield {"input": {"path": str(path)}, "model": facts, "error": {"file": file, "reason": reason}}


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, MolreError) else f"{type(err).__name__}: {err}"


def _predict_operating_point(fixed: op.ThresholdsFile, checkpoint: str, setup: dict, precision: str) -> dict:
    """predict's ``model.operating_point``: the thresholds file checked against the loaded model and what the
    predictions record of it."""
    verified = op.check_thresholds_model(fixed, model_identity(setup), checkpoint, precision)
    return {**fixed.applied(), "decision": DECISION, "model_verified": verified}


def _flags(probabilities: dict[str, float], thresholds: np.ndarray) -> dict[str, bool | None]:
    """{finding id: probability >= threshold; None where the threshold is NaN}: evaluate's decision rule
    (``operating_points``) on the probabilities as output (float32 values, compared exactly in float64)."""
    return {fid: None if math.isnan(t) else bool(p >= t)
            for (fid, p), t in zip(probabilities.items(), thresholds.tolist(), strict=True)}  # fmt: skip


def _predict_study(model: MoLREClassifier, cfg: RunConfig, setup: dict, facts: dict, path: str,
                   fixed: op.ThresholdsFile | None = None) -> dict:  # fmt: skip
    study = read_study(path, setup["min_slices"])
    volume = torch.from_numpy(_aligned(study.volume, setup))[None]
    probs = score_volumes(model, cfg, setup, volume)[0].cpu().numpy()
    probabilities = {fid: float(p) for fid, p in zip(FINDING_IDS, probs, strict=True)}
    routing, attention = model.router_weights(), model.slice_attention()
    if routing is None and cfg.adapter.kind == "molre" and cfg.adapter.molre.placement == "blocks":
        routing = model.router_weights(in_blocks=True) or None  # {} under route_by=token: not reported
    routing_rows = (
        {name: _study_rows(g) for name, g in routing.items()}
        if isinstance(routing, dict)
        else _study_rows(routing)
        if routing is not None
        else None
    )
    return {
        "input": {
            "path": path,
            "series": os.path.relpath(study.ref.source, study.base),
            "kind": study.ref.kind,
            "slices": int(study.volume.hu.shape[0]),
            "spacing_mm": [round(float(s), 4) for s in study.volume.spacing],
        },
        "model": facts,
        "findings": [{"id": f.id, "name": f.name, "category": f.category} for f in FINDINGS],
        "probabilities": probabilities,
        **({"flags": _flags(probabilities, fixed.values)} if fixed else {}),
        "slice_z_mm": model_slice_z_mm(setup) if model.backbone.dims == 2 else None,
        "slice_attention": _study_rows(attention) if attention is not None else None,
        "router_weights": routing_rows,
        "skipped_files": [
            {"file": os.path.relpath(e.path, study.base), "reason": e.reason} for e in study.skipped
        ],
    }


def _study_rows(weights: torch.Tensor) -> list:
    """The scored study's (batch row 0) weights as rounded floats; bf16 under bf16 autocast, which numpy lacks."""
    return weights[0].float().cpu().numpy().round(5).tolist()


def model_slice_z_mm(setup: dict) -> list[float]:
    """Where each slice a 2D model sees lies, inferior to superior: its centre in mm above the centre of the
    aligned grid. Alignment puts ``grid[0]`` slices of ``spacing[0]`` mm around the head (the skull's z-extent
    centred, or its top kept one slice below the grid's top; within half an input slice, as the grid snaps to
    the input's voxels); the model takes ``input_size[0]`` = n slices resampled over the same box
    (``resize_volume``: trilinear, align_corners=False): slice i sits at (i + 1/2 - n/2) * grid depth / n."""
    slices, depth_mm = int(setup["input_size"][0]), setup["grid"][0] * setup["spacing"][0]
    return [round((i + 0.5 - slices / 2) * depth_mm / slices, 3) for i in range(slices)]


def _model_facts(checkpoint: str, cfg: RunConfig, setup: dict) -> dict:
    adapter: dict = {"kind": cfg.adapter.kind}
    if cfg.adapter.kind == "molre":
        m = cfg.adapter.molre
        adapter.update(placement=m.placement, route_by=m.route_by, experts=m.experts)
    return {"checkpoint": checkpoint, "preset": cfg.backbone.preset, "adapter": adapter,
            "grid": list(setup["grid"]), "spacing_mm": list(setup["spacing"]),
            "molre_version": __version__}  # fmt: skip


def this_molre_preprocessing() -> dict:
    """The ``RECORDED_AS_IS`` settings (HU range, pad value, alignment, interpolation) of this molre's
    preprocessing, which predict applies to a study: constants of the code, read from the record preprocess
    writes of them into a manifest (``PreprocessConfig.as_dict``) so that the two cannot drift apart."""
    from molre.data.preprocess import PreprocessConfig

    recorded = PreprocessConfig().as_dict()
    return {key: recorded[key] for key in RECORDED_AS_IS}


def _check_study_preprocessing(checkpoint: str, setup: dict, allow: bool) -> dict:
    """predict prepares a study with the checkpoint's grid, spacing, anti-aliasing and minimum slice count
    (``setup``), but with this molre's HU range, pad value, alignment and interpolation, which it cannot set: a
    checkpoint whose training data was preprocessed with others is a DataError naming each setting, unless
    ``allow`` (a warning). A checkpoint from before they were recorded is not compared (a warning). Returns what
    each prediction records, as evaluate's summary.json does."""
    changes, unknown = preprocessing_changes(setup, this_molre_preprocessing(), RECORDED_AS_IS, "this molre")
    if unknown:
        log.warning("predict: preprocessing settings not compared between checkpoint %s and this molre: %s",
                    checkpoint, "; ".join(f"{key} ({why})" for key, why in unknown.items()))  # fmt: skip
    if changes and not allow:
        raise DataError(
            storage.join(checkpoint, "setup.json"),
            f"checkpoint {checkpoint} was trained on data preprocessed unlike this molre prepares a study: "
            f"{'; '.join(changes)}. The model would score inputs it was not trained on; predict with the molre "
            "version that trained it, or pass --allow-preprocessing-mismatch to predict anyway",
        )
    if changes:
        log.warning("predict: checkpoint %s was trained on data preprocessed unlike this molre prepares a study "
                    "(%s); predicting anyway (--allow-preprocessing-mismatch)", checkpoint,
                    "; ".join(changes))  # fmt: skip
    return {"mismatches": changes, "not_compared": unknown, "mismatch_allowed": bool(allow)}


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


class Study(NamedTuple):
    """One study as ``read_study`` loaded it."""

    volume: Volume  # the series scored
    ref: SeriesRef
    base: str  # what names are relative to: the given folder, or a given file's folder
    skipped: list[DataError]  # unreadable files in the series' folder(s), left out of the series


def study_volume(path: str, setup: dict) -> np.ndarray:
    """int16 HU ``[grid]`` of the study at ``path``, prepared as preprocess prepared the run's training
    shards: its alignment, grid, spacing, anti-aliasing and minimum slice count (``setup``, from the
    checkpoint)."""
    return _aligned(read_study(path, setup["min_slices"]).volume, setup)


def _aligned(volume: Volume, setup: dict) -> np.ndarray:
    from molre.data.resample import align_volume

    return align_volume(volume.hu, volume.spacing, volume.direction, out_spacing=tuple(setup["spacing"]),
                        grid=tuple(setup["grid"]), antialias=setup["antialias"])  # fmt: skip


def read_study(path: str, min_slices: int) -> Study:
    """The one study at ``path``; several studies there, or none that loads, is a DataError. Its series are
    tried as preprocess tries them (``largest_first``). The files discover could not read in the folder(s) of
    the series scored come back as ``skipped``; when a series fails, they are added to its error's reason (a
    truncated slice otherwise reads as a gap after its neighbour)."""
    from molre.data.ingest import largest_first, load_series

    refs, rejects, base = _study_series(path)
    errors = []
    for ref in largest_first(refs):
        skipped = _rejects_in_folders(ref, rejects)
        try:
            return Study(load_series(ref, min_slices=min_slices), ref, base, skipped)
        except DataError as err:
            if skipped:
                left_out = _named(skipped, base)
                err = DataError(err.path, f"{err.reason}; unreadable file(s) in its folder: {left_out}")
            errors.append(err)
    raise errors[0]


def _rejects_in_folders(ref: SeriesRef, rejects: list[DataError]) -> list[DataError]:
    """The rejects lying in a folder that holds files of the DICOM series ``ref`` (none for a NIfTI file)."""
    folders = {os.path.dirname(f) for f in ref.files} if ref.kind == "dicom" else set()
    return [e for e in rejects if os.path.dirname(e.path) in folders]


def _named(errors: list[DataError], base: str, shown: int = 5) -> str:
    names = [f"{os.path.relpath(e.path, base)} ({e.reason})" for e in errors[:shown]]
    return ", ".join(names) + (f", and {len(errors) - shown} more" if len(errors) > shown else "")


def _study_series(path: str) -> tuple[list[SeriesRef], list[DataError], str]:
    """The series of one study at ``path`` (a folder, a DICOM file's series, or a NIfTI file), the files under
    that folder (a file's folder) that discover could not read, and that folder."""
    from molre.data.ingest import discover

    if "://" in str(path):
        raise DataError(path, "predict reads local files only; copy the study to a local folder first")
    target = Path(path)
    if not target.exists():
        raise DataError(path, "does not exist")
    folder = target if target.is_dir() else target.parent
    refs, rejects = discover(folder)
    if not target.is_dir():  # the series holding that file
        name = str(folder / target.name)
        refs = [r for r in refs if name in r.files]
        if not refs:
            rejects = [e for e in rejects if e.path == name]
    if not refs:
        raise rejects[0] if rejects else DataError(path, "no DICOM series or NIfTI file found")
    studies = {r.study_uid or r.source for r in refs}  # a NIfTI file is a study of its own
    if len(studies) > 1:
        shown = ", ".join(sorted(r.source for r in refs)[:3])
        raise DataError(path, f"holds {len(studies)} studies ({shown}, ...); give one study's folder or file")
    return refs, rejects, str(folder)


# ---- CLI (two commands share this module) -----------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "checkpoint",
        help="a checkpoint directory written by molre train (local path or s3://), or a run folder "
        "(<train.storage>/<run_name>: its latest checkpoint)",
    )
    if parser.prog.endswith("evaluate"):
        parser.add_argument("--data", required=True, help="preprocessed shard root (local path or s3://)")
        parser.add_argument("--split", default="test", choices=["train", "val", "test"])
        parser.add_argument(
            "--out",
            help="output directory, local path or s3:// (default: CHECKPOINT/eval-SPLIT-<the first 12 hex of the "
            "data manifest's sha256>, one per dataset); what it holds is overwritten",
        )
        parser.add_argument(
            "--allow-preprocessing-mismatch",
            action="store_true",
            help="evaluate data preprocessed unlike the checkpoint's training data (other grid, spacing, "
            "anti-aliasing, ...) with a warning, recorded in summary.json, instead of refusing it",
        )
        parser.add_argument(
            "--bootstrap", type=int, default=0, metavar="N",
            help="95%% CIs of each finding's AUC and of the mean from N study-level resamples (default 0: "
            "none); with --operating-point, of the sensitivity and specificity too",
        )  # fmt: skip
        parser.add_argument(
            "--operating-point", metavar="RULE",
            help="report each finding at a threshold chosen by RULE on --threshold-split: sensitivity=T "
            "(the highest threshold with sensitivity >= T there), specificity=T (the lowest with "
            "specificity >= T) or youden (the most sensitivity + specificity); adds TP/FP/TN/FN, "
            "sensitivity, specificity, PPV and NPV on --split and writes thresholds.json",
        )  # fmt: skip
        parser.add_argument(
            "--threshold-split", choices=list(SPLITS),
            help="the split the thresholds are chosen on (default: val when --split is test; required "
            "otherwise)",
        )  # fmt: skip
        parser.add_argument(
            "--allow-thresholds-on-evaluated-split", action="store_true",
            help="let --threshold-split be --split itself, or --thresholds hold thresholds chosen on this "
            "split of this data: thresholds fitted to the studies they are judged on give optimistic results "
            "(recorded in summary.json and thresholds.json)",
        )  # fmt: skip
        parser.add_argument(
            "--thresholds", metavar="FILE",
            help="apply the thresholds of a thresholds.json (local path or s3://) that --operating-point "
            "wrote for this checkpoint instead of choosing them (e.g. on another hospital's data, which may "
            "have no val split): the same counts and rates on --split; refused for another checkpoint's file",
        )  # fmt: skip
    else:
        parser.add_argument(
            "--input", action="append", default=[], metavar="SERIES",
            help="one study on local disk: a DICOM folder or file, or a NIfTI file; repeat it for several "
            "(one JSON object per line then)",
        )  # fmt: skip
        parser.add_argument(
            "--inputs", metavar="FILE",
            help="a text file listing studies, one path per line (blank lines and lines starting with # "
            "skipped); writes one JSON object per line, an error object for a study that cannot be scored",
        )  # fmt: skip
        parser.add_argument(
            "--allow-preprocessing-mismatch",
            action="store_true",
            help="predict with a checkpoint whose training data was preprocessed unlike this molre prepares a "
            "study (other HU range, pad value, alignment or interpolation) with a warning, recorded in the "
            "output's model.preprocessing, instead of refusing it",
        )
        parser.add_argument(
            "--thresholds", metavar="FILE",
            help="a thresholds.json (local path or s3://) that molre evaluate --operating-point wrote for this "
            "checkpoint: each prediction gets flags, {finding id: score >= its threshold; null where it has "
            "none}, and model.operating_point; refused for another checkpoint's file",
        )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    if hasattr(args, "data"):
        plan = threshold_plan(args.operating_point, args.threshold_split, args.thresholds, args.split,
                              args.allow_thresholds_on_evaluated_split)  # fmt: skip
        checkpoint = _announced(args)
        result = _evaluate(args.checkpoint, checkpoint, args.data, args.split, args.out, args.device,
                           args.allow_preprocessing_mismatch, args.bootstrap, plan)  # fmt: skip
        ci = result.get("mean_auc_ci")
        scored = (
            f"mean AUC {result['mean_auc']:.4f} +- {result['std_auc']:.4f}"
            + (f" (95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else "")
            + f" over {result['n_defined']} findings"
            if result["n_defined"]
            else "no AUC: no finding has both classes among the split's known labels"
        )
        print(f"{scored} on {result['volumes']} volumes; written to {result['out_dir']}")
        if plan:
            print(_operating_point_line(result["operating_point"], result["split"]))
    else:
        return _run_predict(args)
    return 0


def _operating_point_line(point: dict, split: str) -> str:
    """The CLI's line on the operating point: its means on the evaluated split, or why there is none."""
    fixed = "thresholds_file" in point
    origin = f"of {point['thresholds_file']}, chosen on" if fixed else "from"
    where = f"{point['rule']} (thresholds {origin} {point['threshold_split']}"
    where += ", the evaluated split itself: optimistic)" if point["chosen_on_evaluated_split"] else ")"
    if not point["n_thresholds"]:
        why = "the file gives none" if fixed else "none has both classes among its known labels there"
        return f"at {where}: no finding has a threshold ({why})"
    means = ", ".join(f"{label} {_num(point[f'mean_{name}'])}" for name, label in RATES)
    return (f"at {where}: mean {means} on {split} over {point['n_thresholds']} findings with a threshold"
            + ("" if fixed else "; thresholds.json written"))  # fmt: skip


def _run_predict(args) -> int:
    """One study (a single --input): one JSON document, its errors raised (exit 2). Several (--input repeated
    or --inputs): JSON Lines, one object per study as it is scored; exit 1 when any failed."""
    inputs = list(args.input) + (_input_list(args.inputs) if args.inputs else [])
    if not inputs:
        print("molre predict: error: give --input SERIES (repeatable) or --inputs FILE", file=sys.stderr)
        return 2
    checkpoint = _announced(args)
    options = {
        "allow_preprocessing_mismatch": args.allow_preprocessing_mismatch,
        "thresholds": args.thresholds,
    }
    if len(args.input) == 1 and not args.inputs:
        result = predict(checkpoint, inputs[0], args.device, **options)
        _warn_skipped(result)
        print(json.dumps(result, indent=1))
        return 0
    failed = 0
    for result in predict_studies(checkpoint, inputs, args.device, **options):
        if "error" in result:
            failed += 1
            error = result["error"]
            print(f"molre predict: error: {error['file']}: {error['reason']}", file=sys.stderr)
        _warn_skipped(result)
        print(json.dumps(result), flush=True)
    if failed:
        print(f"molre predict: {failed} of {len(inputs)} studies could not be scored", file=sys.stderr)
    return 1 if failed else 0


def _announced(args) -> str:
    """The checkpoint folder ``args.checkpoint`` names (``resolve_checkpoint``), its pick printed before the
    scoring starts (the functions log it, which the CLI does not show; resolving once, here, keeps what is
    printed and what is loaded the same while a run writes new checkpoints)."""
    checkpoint, picked = resolve_checkpoint(args.checkpoint)
    if picked:
        print(f"molre {args.command}: {picked}", file=sys.stderr)
    return checkpoint


def _warn_skipped(result: dict) -> None:
    skipped = result.get("skipped_files") or []
    if skipped:
        names = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped)
        print(f"molre predict: warning: {result['input']['path']}: {len(skipped)} unreadable file(s) left "
              f"out of the series scored: {names}", file=sys.stderr)  # fmt: skip


def _input_list(path: str) -> list[str]:
    """The studies listed in ``path``, one a line, as written (relative ones from the current folder)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read the list of inputs ({type(err).__name__})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
