"""Operating points, their confusion counts and calibration of a multi-label classifier: pure numpy.

Every function takes the matrices ``molre evaluate`` scores a split into, one row per study, one column per
finding: scores [N, C] probabilities, labels [N, C] 0/1 and known [N, C] 0/1 (0: the label is unknown; such an
entry is left out of every count, rate and calibration figure of that finding).

Decision rule: a study is flagged positive for finding c when ``scores[:, c] >= thresholds[c]``. The threshold
is one of the finding's scores on the split it is chosen on (``roc_curve``'s cut points), so tied scores are
flagged together and the rule's target holds on that split counting them all.

Thresholds chosen once are kept in thresholds.json (``molre evaluate --operating-point``) and applied later to
other data or to single studies (``--thresholds``): ``read_thresholds`` reads and checks such a file,
``check_thresholds_model`` refuses one chosen for another model than the one about to score.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
from sklearn.metrics import brier_score_loss, roc_curve

from molre.data import storage
from molre.errors import ConfigError, DataError
from molre.findings import FINDING_IDS

log = logging.getLogger(__name__)

RULES = ("sensitivity", "specificity", "youden")
DECISION = "positive when score >= threshold"  # the rule thresholds are applied by (evaluate, predict)
ECE_BINS = 10  # equal-width bins on [0, 1]
# sensitivity / specificity are count ratios (27/30) compared with a decimal target (0.9); a ratio equal to the
# target in the reals rounds to the same float, and this margin keeps it so should either be an ulp off
SLACK = 1e-12


class OperatingRule(NamedTuple):
    kind: str  # "sensitivity" | "specificity" | "youden"
    target: float | None  # the least sensitivity / specificity to reach; None for youden

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}={self.target:.15g}"


def parse_rule(text: str) -> OperatingRule:
    """``sensitivity=T``, ``specificity=T`` (0 < T <= 1) or ``youden``; anything else is a ConfigError."""
    kind, sep, value = str(text).strip().partition("=")
    kind = kind.strip().lower()
    if kind == "youden" and not sep:
        return OperatingRule("youden", None)
    usage = "give sensitivity=T or specificity=T with 0 < T <= 1 (e.g. sensitivity=0.9), or youden"
    if kind not in RULES:
        raise ConfigError(f"operating point {text!r}: unknown rule; {usage}")
    if kind == "youden" or not sep:
        needs = "takes no target" if kind == "youden" else "needs a target"
        raise ConfigError(f"operating point {text!r}: {kind} {needs}; {usage}")
    try:
        target = float(value)
    except ValueError:
        raise ConfigError(f"operating point {text!r}: {value.strip()!r} is not a number; {usage}") from None
    if not 0 < target <= 1:  # NaN fails too
        raise ConfigError(f"operating point {text!r}: the target {value.strip()} is outside (0, 1]; {usage}")
    return OperatingRule(kind, target)


# ---- choosing thresholds ----------------------------------------------------------------------------------


def choose_thresholds(
    scores: np.ndarray, labels: np.ndarray, known: np.ndarray, rule: OperatingRule, where: str = "the split"
) -> tuple[np.ndarray, list[str | None]]:
    """thresholds [C] (NaN: none) chosen by ``rule`` on these [N, C] matrices, and per finding why there is no
    threshold (None where there is one); ``where`` names the split in those reasons."""
    columns = range(scores.shape[1])
    chosen = [_threshold(scores[:, c], labels[:, c], known[:, c], rule, where) for c in columns]
    return np.array([t for t, _ in chosen], dtype=np.float64), [why for _, why in chosen]


def _threshold(score, label, known, rule: OperatingRule, where: str) -> tuple[float, str | None]:
    """One finding's threshold [N] -> (threshold, None) or (NaN, reason): both classes are needed among the
    known labels, and a threshold that flags no study of the split (roc_curve's first cut, inf) is none."""
    keep = np.asarray(known).astype(bool)
    y, s = np.asarray(label)[keep].astype(bool), np.asarray(score, dtype=np.float64)[keep]
    if not y.size:
        return math.nan, f"no known label in {where}"
    if y.all() or not y.any():
        missing = "negative" if y.all() else "positive"
        return math.nan, f"no {missing} among the {y.size} known labels of {where}"
    # cuts decreasing; tpr[i], fpr[i]: rates of flagging score >= cuts[i]; drop_intermediate=False keeps every
    # distinct score (a dropped collinear point could be the one exactly at the target)
    fpr, tpr, cuts = roc_curve(y, s, drop_intermediate=False)
    i = _pick(fpr, tpr, rule)
    if np.isfinite(cuts[i]):
        return float(cuts[i]), None
    if rule.kind == "youden":
        return math.nan, f"no threshold has Youden's J > 0 on {where}"
    return math.nan, f"only flagging no study reaches {rule} on {where}"


def _pick(fpr: np.ndarray, tpr: np.ndarray, rule: OperatingRule) -> int:
    """The chosen index of the ROC points [K], ordered by decreasing threshold (tpr, fpr non-decreasing)."""
    if rule.kind == "sensitivity":
        # the highest threshold with TP / (TP + FN) >= T, i.e. the best specificity there; tpr[-1] = 1 >= T
        return int(np.argmax(tpr >= rule.target - SLACK))
    if rule.kind == "specificity":
        # the lowest threshold with TN / (TN + FP) = 1 - fpr >= T, i.e. the best sensitivity there; fpr[0] = 0
        return int(np.flatnonzero(1 - fpr >= rule.target - SLACK)[-1])
    # Youden's J = sensitivity + specificity - 1 = tpr - fpr, at its largest; a tie: the highest threshold
    return int(np.argmax(tpr - fpr))


# ---- counts and rates at fixed thresholds -----------------------------------------------------------------


def _cells(scores, labels, known, thresholds) -> dict[str, np.ndarray]:
    """The four cells as [N, C] bool masks over known labels; a NaN threshold flags nothing (masked later)."""
    k, y = np.asarray(known).astype(bool), np.asarray(labels).astype(bool)
    flag = np.asarray(scores, dtype=np.float64) >= np.asarray(thresholds, dtype=np.float64)  # [N, C]
    return {"tp": k & y & flag, "fp": k & ~y & flag, "tn": k & ~y & ~flag, "fn": k & y & ~flag}


def confusion(scores, labels, known, thresholds) -> dict[str, np.ndarray]:
    """{"tp", "fp", "tn", "fn"}: [C] counts over known labels at ``thresholds`` [C] (float64: NaN where the
    threshold is NaN)."""
    defined = ~np.isnan(np.asarray(thresholds, dtype=np.float64))
    cells = _cells(scores, labels, known, thresholds)
    return {name: np.where(defined, cell.sum(0), np.nan) for name, cell in cells.items()}


def rates(tp, fp, tn, fn) -> dict[str, np.ndarray]:
    """sensitivity TP/(TP+FN), specificity TN/(TN+FP), PPV TP/(TP+FP), NPV TN/(TN+FN), each [C] (or [B, C]);
    NaN where the denominator is 0 (no positive, no negative, nothing flagged, nothing cleared)."""
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}  # fmt: skip


def _ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)  # den NaN (no threshold): NaN too


def nan_mean(values) -> float:
    """The mean of the defined (non-NaN) values; NaN when there is none."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


# ---- study-level bootstrap --------------------------------------------------------------------------------


def weighted_auc(score: np.ndarray, label: np.ndarray, known: np.ndarray, counts: np.ndarray) -> np.ndarray:
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


def study_resamples(n: int, n_boot: int, seed: int | list[int] = 0, chunk: int = 256) -> Iterator[np.ndarray]:
    """``n_boot`` resamples of N studies with replacement, ``chunk`` at a time: [b, N] float64 counts of how
    often each study is drawn (seeded: the same draws on a re-run, and for every statistic resampled with
    one seed; [256, N] is 20 MB for N = 10,000). ``seed`` may be a list ([seed, 1]: another, independent
    stream of draws, for other studies)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.multinomial(n, np.full(n, 1 / n), size=min(chunk, n_boot - start)).astype(np.float64)


def percentile_cis(
    boot: np.ndarray, whole: np.ndarray, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
    """Percentile CIs from resampled statistics boot [B, C] (NaN: undefined in that resample, left out) for
    the findings defined on the whole split (whole [C] not NaN; NaN CIs elsewhere): low [C], high [C], and
    the CI of the per-resample mean over those findings (None where there is none)."""
    defined = ~np.isnan(whole)
    tail = 100 * (1 - level) / 2
    with warnings.catch_warnings():  # all-NaN columns (undefined findings) are NaN, on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(np.where(defined, boot, np.nan), [tail, 100 - tail], axis=0)
        means = np.nanmean(boot[:, defined], axis=1) if defined.any() else np.full(len(boot), np.nan)
    mean_ci = np.nanpercentile(means, [tail, 100 - tail]).tolist() if not np.isnan(means).all() else None
    return low, high, mean_ci


# how ``bootstrap_rates`` computed a CI, as the outputs record it: without a rule (a file's thresholds), with one
CI_FIXED = "thresholds fixed"
CI_RECHOSEN = "thresholds re-chosen per replicate"


def bootstrap_rate_cis(
    scores, labels, known, thresholds, n_boot: int, seed: int = 0, level: float = 0.95, *,
    rule: OperatingRule | None = None, chosen_on: tuple | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray, list[float] | None]]:  # fmt: skip
    """{"sensitivity", "specificity"}: ``percentile_cis`` of ``bootstrap_rates`` (same arguments) around the
    rates at ``thresholds`` [C] on the whole evaluated split."""
    boot = bootstrap_rates(scores, labels, known, thresholds, n_boot, seed, rule=rule, chosen_on=chosen_on)
    whole = rates(**confusion(scores, labels, known, thresholds))
    return {name: percentile_cis(draws, whole[name], level) for name, draws in boot.items()}


def bootstrap_rates(
    scores, labels, known, thresholds, n_boot: int, seed: int = 0, *,
    rule: OperatingRule | None = None, chosen_on: tuple | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """{"sensitivity", "specificity"}: [n_boot, C] rates on resamples of the evaluated studies (scores,
    labels, known [N, C]), drawn as ``evaluate.bootstrap_auc_ci`` draws them (``study_resamples``, same seed:
    the same draws); a study drawn m times counts m times; NaN where a rate is undefined in a resample.

    ``rule`` None: at the fixed ``thresholds`` [C] (a thresholds file's, chosen on other data): TP of a
    resample = counts [b, N] @ tp-mask [N, C]. With ``rule`` (the thresholds [C] were chosen by it here):
    each replicate also resamples the threshold split ``chosen_on`` (its scores, labels, known; its own
    draws, seed [seed, 1]: other studies) and re-chooses every finding's threshold by ``rule`` on that
    resample (``resampled_thresholds``), applied to the replicate's evaluated resample
    (``_resampled_cells``), so the CIs carry the thresholds' uncertainty from a finite threshold split too.
    ``chosen_on`` None: the thresholds were chosen on the evaluated split itself, and one resample serves
    both. A finding without a threshold on the whole threshold split (NaN in ``thresholds``) is NaN in every
    replicate; a replicate where the rule gives none (a class not drawn; only flagging nothing reaches it)
    leaves the finding out of that replicate, as ``percentile_cis`` leaves out any undefined rate."""
    thresholds = np.asarray(thresholds, dtype=np.float64)
    draws = study_resamples(len(scores), n_boot, seed)
    boot: dict[str, list[np.ndarray]] = {"sensitivity": [], "specificity": []}
    if rule is None:
        cells = {
            name: mask.astype(np.float64) for name, mask in _cells(scores, labels, known, thresholds).items()
        }
        for counts in draws:
            tp, fp, tn, fn = (counts @ cells[name] for name in ("tp", "fp", "tn", "fn"))  # each [b, C]
            boot["sensitivity"].append(_ratio(tp, tp + fn))
            boot["specificity"].append(_ratio(tn, tn + fp))
        return {name: np.concatenate(parts) for name, parts in boot.items()}
    pairs = (
        ((counts, counts) for counts in draws)
        if chosen_on is None
        else zip(draws, study_resamples(len(chosen_on[0]), n_boot, [seed, 1]), strict=True)
    )
    there = (scores, labels, known) if chosen_on is None else chosen_on
    for counts, counts_there in pairs:
        for part in boot.values():
            part.append(np.full((len(counts), scores.shape[1]), np.nan))
        for c in np.flatnonzero(~np.isnan(thresholds)):
            chosen = resampled_thresholds(*(m[:, c] for m in there), rule, counts_there)  # [b]
            tp, fp, tn, fn = _resampled_cells(scores[:, c], labels[:, c], known[:, c], chosen, counts)
            boot["sensitivity"][-1][:, c] = _ratio(tp, tp + fn)
            boot["specificity"][-1][:, c] = _ratio(tn, tn + fp)
    return {name: np.concatenate(parts) for name, parts in boot.items()}


def resampled_thresholds(score, label, known, rule: OperatingRule, counts: np.ndarray) -> np.ndarray:
    """[b] thresholds of one finding chosen by ``rule`` on each of b resamples of its split, as
    ``_threshold`` chooses on the drawn studies repeated (NaN: none), all at once; ``counts`` [b, N]: how
    often each study is drawn in each resample (``study_resamples``).

    ``roc_curve``'s points on a resample: point 0 (inf: flags none), then a cut at each distinct drawn
    score, decreasing; TP(k), FP(k) = drawn positives / negatives scoring >= the k-th, the rates over the
    drawn totals. ``sensitivity`` and ``youden`` take the first (highest) cut reaching their target /
    maximum, and a cut at no positive's score adds no TP, so it never comes first: their cuts are the
    positives' scores. ``specificity`` takes the lowest cut reaching it: FP grows down the cuts, so those
    reaching it lie above the first negative's score x where it fails (-inf: none fails), and the lowest is
    the lowest score > x drawn (of either class)."""
    keep = np.asarray(known).astype(bool)
    s, rows = np.asarray(score, dtype=np.float64)[keep], np.flatnonzero(keep)
    y = np.asarray(label)[keep].astype(bool)
    if not y.any() or y.all():  # a class missing from the split is missing from every resample
        return np.full(len(counts), np.nan)
    (pos, pos_drawn), (neg, neg_drawn) = (_cumulative(s[c], rows[c], counts) for c in (y, ~y))
    n_pos, n_neg = pos_drawn[:, -1], neg_drawn[:, -1]  # [b]
    both = (n_pos > 0) & (n_neg > 0)  # without: no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        if rule.kind == "specificity":
            cuts = np.r_[np.inf, np.unique(neg)[::-1]]  # [K + 1] decreasing
            fpr = (n_neg[:, None] - _drawn_below(neg, neg_drawn, cuts)) / n_neg[:, None]
            first_failing = (1 - fpr >= rule.target - SLACK).sum(axis=1)  # [b]: they reach it in a prefix
            x = np.r_[cuts, -np.inf][first_failing]
            lowest = np.minimum(
                _lowest_drawn_above(pos, pos_drawn, x), _lowest_drawn_above(neg, neg_drawn, x)
            )
            return np.where(both & np.isfinite(lowest), lowest, np.nan)  # none above x: only flagging nothing
        cuts = np.r_[np.inf, np.unique(pos)[::-1]]  # [K + 1] decreasing
        tpr = (n_pos[:, None] - _drawn_below(pos, pos_drawn, cuts)) / n_pos[:, None]  # [b, K + 1]
        if rule.kind == "sensitivity":  # the highest threshold reaching the target
            i = np.argmax(tpr >= rule.target - SLACK, axis=1)
        else:  # Youden's J at its largest; a tie: the highest threshold
            fpr = (n_neg[:, None] - _drawn_below(neg, neg_drawn, cuts)) / n_neg[:, None]
            i = np.argmax(tpr - fpr, axis=1)
    # point 0 (inf): only flagging nothing reaches the rule, no threshold
    return np.where(both & (i > 0), cuts[i], np.nan)


def _resampled_cells(
    score, label, known, thresholds: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, ...]:
    """TP, FP, TN, FN [b] of one finding, resample r (row r of ``counts`` [b, N]) at its own threshold
    ``thresholds[r]``: the drawn positives / negatives scoring below it are cleared (FN, TN), the rest
    flagged. NaN where the threshold is NaN."""
    keep = np.asarray(known).astype(bool)
    s, rows = np.asarray(score, dtype=np.float64)[keep], np.flatnonzero(keep)
    y = np.asarray(label)[keep].astype(bool)
    none = np.isnan(thresholds)
    cuts = np.where(none, np.inf, thresholds)
    cells = []
    for cls in (y, ~y):  # a class may be missing from the evaluated split
        ascending, drawn = _cumulative(s[cls], rows[cls], counts)
        cleared = _drawn_below(ascending, drawn, cuts, per_resample=True)
        cells += [(drawn[:, -1] if ascending.size else 0.0) - cleared, cleared]
    tp, fn, fp, tn = (np.where(none, np.nan, cell) for cell in cells)
    return tp, fp, tn, fn


def _cumulative(s: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The scores ``s`` [n] of the studies ``rows`` [n] ascending, and [b, n]: how many of the j + 1 lowest
    were drawn in each resample (``counts`` [b, N]); a cumulative sum along axis 1, which numpy runs
    fastest."""
    order = np.argsort(s, kind="stable")
    return s[order], np.cumsum(np.take(counts, rows[order], axis=1), axis=1)


def _drawn_below(ascending: np.ndarray, drawn: np.ndarray, cuts: np.ndarray, per_resample: bool = False):
    """How many of the studies scoring below a cut were drawn, from ``_cumulative``'s pair: [b, K] for
    ``cuts`` [K] shared by the resamples, or [b] for ``per_resample`` cuts [b], one each."""
    if not ascending.size:
        return np.zeros(len(drawn) if per_resample else (len(drawn), len(cuts)))
    below = np.searchsorted(ascending, cuts, "left")  # how many score below each cut
    at = np.maximum(below - 1, 0)  # drawn[:, j]: among the j + 1 lowest
    return np.where(below > 0, drawn[np.arange(len(drawn)), at] if per_resample else drawn[:, at], 0.0)


def _lowest_drawn_above(ascending: np.ndarray, drawn: np.ndarray, x: np.ndarray) -> np.ndarray:
    """[b]: the lowest score > x[r] drawn in resample r, from ``_cumulative``'s pair (inf: none): the first
    study whose cumulative draws exceed those of the studies scoring <= x[r]."""
    up_to_x = _drawn_below(ascending, drawn, np.nextafter(x, np.inf), per_resample=True)  # drawn <= x
    return np.r_[ascending, np.inf][(drawn <= up_to_x[:, None]).sum(axis=1)]


# ---- calibration ------------------------------------------------------------------------------------------


def brier_scores(scores, labels, known) -> np.ndarray:
    """[C] Brier scores, mean (score - label)^2 over each finding's known labels (sklearn's
    ``brier_score_loss``; one class only is fine); NaN where a finding has no known label."""
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = np.asarray(known[:, c]).astype(bool)
        if keep.any():
            y, s = np.asarray(labels[keep, c]).astype(np.int64), np.asarray(scores[keep, c], dtype=np.float64)
            out[c] = brier_score_loss(y, s, pos_label=1)
    return out


def expected_calibration_error(scores, labels, known, bins: int = ECE_BINS) -> np.ndarray:
    """[C] ECEs over each finding's known labels; NaN where a finding has none. ``bins`` equal-width bins on
    [0, 1]: bin b = floor(bins * score) holds scores in [b/bins, (b+1)/bins), a score of 1.0 the last one.
    ECE = sum_b (n_b / n) |mean label in b - mean score in b| = sum_b |sum of labels - sum of scores in b| / n
    (empty bins add 0)."""
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = np.asarray(known[:, c]).astype(bool)
        if keep.any():
            y = np.asarray(labels[keep, c], dtype=np.float64)  # [n]
            s = np.asarray(scores[keep, c], dtype=np.float64)  # [n]
            b = np.clip(np.floor(s * bins), 0, bins - 1).astype(np.int64)  # [n] bin of each study
            gap = np.bincount(b, weights=y, minlength=bins) - np.bincount(b, weights=s, minlength=bins)
            out[c] = np.abs(gap).sum() / s.size
    return out


# ---- thresholds.json: thresholds chosen once, applied later -----------------------------------------------

THRESHOLDS_FORMAT = "molre-thresholds/1"  # later keys are additions: a reader of /1 reads them all
# What identifies the model that scored, recorded in thresholds.json (and summary.json): the sha256 of its
# trained tensors as loaded from best.safetensors (``evaluate.trained_digest``) and setup.json's frozen_sha256
# (None in checkpoints from before it). Both are digests of content, so a checkpoint moved or copied (local to
# S3, a run folder renamed) keeps them, and any retraining changes the first.
MODEL_KEYS = ("trained_sha256", "frozen_sha256")


class ThresholdsFile(NamedTuple):
    """A thresholds.json as ``read_thresholds`` read it."""

    uri: str
    sha256: str  # of the file's bytes: what the outputs that apply it record
    doc: dict  # the file as written: rule, split, the provenance of the scores they were chosen on
    values: np.ndarray  # [C] float64 in FINDING_IDS order; NaN: no threshold
    reasons: list[str | None]  # [C] why a finding has none (None where it has one)

    def applied(self) -> dict:
        """What an output applying these thresholds records of them: the file (and its sha256), the rule, and
        where they were chosen (split, data, manifest, checkpoint, as the file records them)."""
        doc = self.doc
        return {"rule": doc.get("rule"), "threshold_split": doc.get("split"), "thresholds_file": self.uri,
                "thresholds_sha256": self.sha256, "threshold_data": doc.get("data"),
                "threshold_manifest_sha256": doc.get("manifest_sha256"),
                "threshold_checkpoint": doc.get("checkpoint")}  # fmt: skip


def read_thresholds(uri: str) -> ThresholdsFile:
    """The thresholds.json at ``uri`` (local or s3://, through ``molre.data.storage``). A DataError naming the
    file when it cannot be read, is no molre thresholds file, holds a threshold that is neither a number nor
    null, or its finding ids are not this molre's: thresholds are matched to the model's outputs by finding
    id, and another id list means another molre's findings, whose thresholds would miss theirs."""
    uri = str(uri)
    blob = _thresholds_bytes(uri)
    try:
        doc = json.loads(blob)
    except ValueError as err:  # UnicodeDecodeError too
        raise DataError(uri, f"not a JSON file ({type(err).__name__}: {err})") from None
    if (
        not isinstance(doc, dict)
        or doc.get("format") != THRESHOLDS_FORMAT
        or not isinstance(doc.get("thresholds"), dict)
    ):
        raise DataError(uri, f"not a molre thresholds file (format {THRESHOLDS_FORMAT}, as molre evaluate "
                             "--operating-point writes it)")  # fmt: skip
    _check_finding_ids(uri, doc["thresholds"])
    parsed = [_threshold_record(uri, fid, doc["thresholds"][fid]) for fid in FINDING_IDS]
    values = np.array([t for t, _ in parsed], dtype=np.float64)
    return ThresholdsFile(uri, storage.sha256_bytes(blob), doc, values, [why for _, why in parsed])


def _thresholds_bytes(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except (FileNotFoundError, storage.StorageError) as err:
        # an evaluation's folder given for its file: locally a StorageError (IsADirectoryError), on S3 a
        # FileNotFoundError (a prefix is no object)
        if storage.is_dir(uri):
            raise DataError(uri, "is a folder; give the thresholds.json file in it") from None
        if isinstance(err, FileNotFoundError):
            raise DataError(uri, "no such thresholds file (molre evaluate --operating-point writes "
                                 "thresholds.json into its output folder)") from None  # fmt: skip
        raise


def _check_finding_ids(uri: str, records: dict) -> None:
    known = set(FINDING_IDS)
    missing, unknown = [f for f in FINDING_IDS if f not in records], [f for f in records if f not in known]
    if missing or unknown:
        raise DataError(uri, f"its finding ids are not this molre's {len(FINDING_IDS)}: {_few(missing)} "
                             f"missing, {_few(unknown)} unknown; it was written for another finding list, so "
                             "its thresholds would not fall on the findings they were chosen for")  # fmt: skip


def _few(ids: list[str], shown: int = 5) -> str:
    if not ids:
        return "none"
    return f"{len(ids)} ({', '.join(ids[:shown])}{', ...' if len(ids) > shown else ''})"


def _threshold_record(uri: str, fid: str, record) -> tuple[float, str | None]:
    """(threshold, None), or (NaN, the file's reason) for a null threshold."""
    if not isinstance(record, dict) or "threshold" not in record:
        raise DataError(uri, f"finding {fid}: no threshold record (an object with a threshold, or null)")
    value = record["threshold"]
    if value is None:
        return math.nan, record.get("reason") or "no threshold in the thresholds file"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(uri, f"finding {fid}: threshold {value!r} is neither a number nor null")
    return float(value), None


def check_thresholds_model(thresholds: ThresholdsFile, model: dict, checkpoint: str, precision: str) -> bool:
    """Refuse thresholds chosen on another model's scores than ``model``'s (``MODEL_KEYS`` of the checkpoint
    about to score): a threshold is a score of one model and means nothing for another. A ConfigError naming
    the file; no override, as the digests are of content: they differ only for another model, and the cure is
    to choose thresholds for this one. A file from before ``trained_sha256`` was recorded cannot be checked
    (a warning naming the checkpoint it records). Scores in another precision than the file's (bf16 vs fp32:
    ~1e-3 apart) warn: a study that close to a threshold may be flagged otherwise. Returns whether the model
    was checked."""
    doc = thresholds.doc
    for key in MODEL_KEYS:  # a side without the digest (older file, older checkpoint) is not compared
        if doc.get(key) and model.get(key) and doc[key] != model[key]:
            raise ConfigError(
                f"thresholds: {thresholds.uri} was chosen on the scores of another model than checkpoint "
                f"{checkpoint} ({key} {doc[key][:12]}... in the file vs {model[key][:12]}... here; the file "
                f"names checkpoint {doc.get('checkpoint')}): a threshold is one model's score and means nothing "
                "for another; give the thresholds.json of this checkpoint, or choose thresholds for it with "
                "molre evaluate --operating-point"
            )
    chosen_in = doc.get("precision")
    if chosen_in and chosen_in != precision:
        log.warning("thresholds %s were chosen on %s scores, applied to %s ones (~1e-3 apart): a study that "
                    "close to a threshold may be flagged otherwise", thresholds.uri, chosen_in,
                    precision)  # fmt: skip
    if not doc.get("trained_sha256"):
        log.warning("thresholds %s record no trained_sha256 (written by an older molre): not checked to belong "
                    "to checkpoint %s; they were chosen with checkpoint %s", thresholds.uri, checkpoint,
                    doc.get("checkpoint"))  # fmt: skip
        return False
    return True


# ---- what evaluate and compare write ---------------------------------------------------------------------


def json_bytes(value: dict) -> bytes:
    """Strict JSON (an undefined mean AUC is null, not NaN) of a results dict: summary.json, thresholds.json."""
    return json.dumps(json_safe(value), indent=1, allow_nan=False).encode()


def json_safe(value):
    """``value`` with NaN / infinity as None (strict JSON) and numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- Markdown ---------------------------------------------------------------------------------------------
