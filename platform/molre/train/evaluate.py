"""`molre evaluate`: score a checkpoint's best weights on a split of preprocessed shards.

Per-finding AUCs and calibration (Parquet + Markdown), mean +- std and stratified counts, as ``summary.json``
with the provenance (checkpoint, data and its manifest's sha256, split, molre version, precision, the model's
digests), and each study's scores; optionally an operating point chosen on another split (thresholds.json; the
arithmetic: ``molre.train.operating_points``) or one a thresholds.json gives (``--thresholds``: chosen for the
same model, on other data); refuses data preprocessed unlike the checkpoint's training data. Takes a checkpoint
folder or a run folder (its latest checkpoint) and scores as the run's validation did (``molre.train.scoring``).
Runs in-process on one device (no cluster needed) and reads shards with pyarrow. The checkpoint, the data and
the output folder may each be a local path or an ``s3://`` URI (read and written through
``molre.data.storage``).
"""

from __future__ import annotations

import io
import logging
import math
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd
import torch

from molre import __version__
from molre.config import RunConfig
from molre.data import shards, storage
from molre.errors import ConfigError, WeightsError
from molre.findings import FINDING_IDS, FINDINGS
from molre.train import operating_points as op
from molre.train.checkpoint import preprocessing_changes, read_fingerprint, read_setup
from molre.train.metrics import per_finding_auc, summarize
from molre.train.scoring import (
    add_checkpoint_arguments,
    announced,
    load_checkpoint_model,
    model_identity,
    preprocessing_verdict,
    resolve_checkpoint,
    score_volumes,
    scoring_precision,
)

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


def _iter_split(root: str, split: str, batch_size: int, manifest: shards.Manifest | None = None):
    manifest = manifest or shards.read_manifest(root)
    for uri in shards.list_shards(root, split, manifest):
        table = shards.read_shard(uri, verify=True)  # checksum + schema: a corrupt shard is never scored
        for batch in table.to_batches(max_chunksize=batch_size):
            yield batch.to_pydict()


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
    TP / FP / TN / FN, sensitivity, specificity, PPV and NPV (with ``bootstrap``, CIs of the two rates that
    re-choose the thresholds on each resample of the threshold split: ``operating_points.bootstrap_rates``);
    the thresholds also go to thresholds.json (``operating_plan``), with the model's digests.

    ``thresholds`` (a thresholds.json, local or s3://; instead of ``operating_point``): apply the file's
    thresholds as they are, e.g. to another hospital's data, which may have no val split. The file must have
    been written for this model (``operating_points.check_thresholds_model``); one chosen on this very split of
    this very data needs ``allow_thresholds_on_evaluated_split``. summary.json's ``operating_point`` records
    the file and its sha256 (``threshold_plan``); the rates' CIs hold its thresholds fixed."""
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
        ("summary.json", op.json_bytes(result)),
    ]
    if thresholds:
        files.append(("thresholds.json", op.json_bytes(_thresholds_file(thresholds, result))))
    for name, blob in files:
        storage.write_bytes(storage.join(out, name), blob)
    return {**result, "out_dir": out}


def _add_calibration(table: pd.DataFrame, scores, labels, known) -> dict:
    """Each finding's Brier score and ECE as table columns ``brier`` / ``ece``; for summary.json their means
    over the findings with a known label, and ``..._with_positives`` over those with a known positive (the
    first is dominated by the many findings without one, trivially easy to score near 0)."""
    table["brier"] = op.brier_scores(scores, labels, known)
    table["ece"] = op.expected_calibration_error(scores, labels, known)
    positive = table["positives"].to_numpy() > 0  # known positives (_per_finding_table)
    return {"mean_brier": op.nan_mean(table["brier"]), "mean_ece": op.nan_mean(table["ece"]),
            "mean_brier_with_positives": op.nan_mean(table["brier"][positive]),
            "mean_ece_with_positives": op.nan_mean(table["ece"][positive]),
            "calibration": {"findings": int(table["brier"].notna().sum()),
                            "findings_with_positives": int(positive.sum()), "ece_bins": op.ECE_BINS,
                            "ece_binning": "equal-width on [0, 1], floor(10 * score)"}}  # fmt: skip


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
    rechoose = (plan.rule, None if plan.on_evaluated else chosen_on)  # the evaluated split: one resample
    result["operating_point"] = point | _apply_thresholds(table, thresholds, reasons, evaluated, bootstrap,
                                                          rechoose)  # fmt: skip
    return _threshold_records(thresholds, reasons, chosen_on)


def _add_fixed_point(table: pd.DataFrame, result: dict, plan: FixedPlan, evaluated: tuple, bootstrap: int):
    """A thresholds file's thresholds applied to ``evaluated`` (``_apply_thresholds``) as summary.json's
    ``operating_point``, which records the file (its sha256) and where its thresholds were chosen."""
    fixed = plan.thresholds
    applied = _apply_thresholds(table, fixed.values, fixed.reasons, evaluated, bootstrap)
    result["operating_point"] = {**fixed.applied(), "chosen_on_evaluated_split": plan.on_evaluated,
                                 "model_verified": plan.verified, **applied}  # fmt: skip


def _apply_thresholds(table: pd.DataFrame, thresholds: np.ndarray, reasons: list, evaluated: tuple,
                      bootstrap: int, rechoose: tuple | None = None) -> dict:  # fmt: skip
    """Thresholds [C] (NaN: none, for ``reasons``) applied to ``evaluated``: table columns threshold,
    threshold_reason, tp / fp / tn / fn (NA without a threshold), sensitivity, specificity, ppv, npv (+ the
    two rates' CIs with ``bootstrap``). Returns the operating point's decision rule, how many findings have a
    threshold, which have none, and the rates' means over the findings where each is defined (+ CIs, and
    ``ci_method``: how they were computed). ``rechoose``, for thresholds chosen in this evaluation: (rule,
    the threshold split's scores, labels, known; None where it is the evaluated split), whose thresholds the
    CIs re-choose on each resample (``op.bootstrap_rates``); without it they hold them fixed."""
    counts = op.confusion(*evaluated, thresholds)
    measured = op.rates(**counts)
    table["threshold"], table["threshold_reason"] = thresholds, reasons
    for name, column in counts.items():
        table[name] = pd.Series(column).astype("Int64").array
    for name, column in measured.items():
        table[name] = column
    point = {"decision": op.DECISION, "n_thresholds": int((~np.isnan(thresholds)).sum()),
             "no_threshold": [fid for fid, why in zip(FINDING_IDS, reasons, strict=True) if why]}  # fmt: skip
    point |= {f"mean_{name}": op.nan_mean(column) for name, column in measured.items()}
    if bootstrap:
        rule, chosen_on = rechoose or (None, None)
        cis = op.bootstrap_rate_cis(*evaluated, thresholds, bootstrap, rule=rule, chosen_on=chosen_on)
        for name, (low, high, mean_ci) in cis.items():
            table[f"{name}_ci_low"], table[f"{name}_ci_high"] = low, high
            point[f"mean_{name}_ci"] = mean_ci
        point["ci_method"] = op.CI_RECHOSEN if rechoose else op.CI_FIXED
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
    listed = "; ".join(changes)
    return preprocessing_verdict(
        changes, unknown, allow, log,
        not_compared=f"evaluate: preprocessing settings not compared between checkpoint {checkpoint} and {data}",
        refused=(storage.join(str(data), shards.MANIFEST),
                 f"preprocessed unlike the training data of checkpoint {checkpoint}: {listed}. The model would "
                 "score inputs it was not trained on; preprocess the data with the checkpoint's settings, or pass "
                 "--allow-preprocessing-mismatch to evaluate anyway"),
        allowed=f"evaluate: {data} is preprocessed unlike checkpoint {checkpoint}'s training data ({listed}); "
                "evaluating anyway (--allow-preprocessing-mismatch)",
    )  # fmt: skip


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
    unit and each resample needs every AUC recomputed, done as a weighted Mann-Whitney count
    (``op.weighted_auc``)."""
    columns = range(scores.shape[1])
    boot = np.concatenate([  # [n_boot, C]; the draws: [256, N] counts at a time (``study_resamples``)
        np.stack([op.weighted_auc(scores[:, k], labels[:, k], known[:, k], counts) for k in columns], axis=1)
        for counts in op.study_resamples(len(scores), n_boot, seed)
    ])  # fmt: skip
    return op.percentile_cis(boot, per_finding_auc(scores, labels, known), level)


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
        f"equal-width score bins); over the {result['calibration']['findings_with_positives']} findings with a "
        f"known positive: mean Brier score {_num(result['mean_brier_with_positives'], 4)}, mean ECE "
        f"{_num(result['mean_ece_with_positives'], 4)}.",
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
    if "ci_method" in point:
        lines += ["", f"95% CIs (in parentheses) from study resamples, {_ci_method(point)}."]
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


def _ci_method(point: dict) -> str:
    """How the operating point's CIs were computed, in words (its ``ci_method``)."""
    if point["ci_method"] == op.CI_FIXED:
        return "the thresholds held fixed (the uncertainty of where they were chosen is not included)"
    where = ("the same resample" if point["chosen_on_evaluated_split"]
             else f"a resample of {point['threshold_split']} drawn with each")  # fmt: skip
    return (
        f"the thresholds re-chosen by {point['rule']} on {where} (the uncertainty of choosing them included)"
    )


def _row_ci(row: dict, name: str) -> list[float] | None:
    low, high = row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")
    return None if low is None or np.isnan(low) else [low, high]


def _num(value, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


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


# ---- CLI --------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_checkpoint_arguments(parser)
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
        "none); with --operating-point, of the sensitivity and specificity too, the thresholds re-chosen on "
        "each resample of --threshold-split (with --thresholds: held fixed)",
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


def run(args) -> int:
    plan = threshold_plan(args.operating_point, args.threshold_split, args.thresholds, args.split,
                          args.allow_thresholds_on_evaluated_split)  # fmt: skip
    checkpoint = announced(args)
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
    return 0
