"""`molre compare EVAL_A EVAL_B`: two models on the same studies, per finding, with paired statistics.

Reads two ``molre evaluate`` output folders (local or ``s3://``, through ``molre.data.storage``): each one's
scores.parquet (per study: ``study_hash``, and the 75 ``scores`` / ``labels`` / ``known`` in ``FINDING_IDS``
order) and summary.json (its provenance). Refuses, naming the folder and the reason, unless both scored the
same data (manifest sha256) and split, the same studies (``study_hash`` sets equal, each once; rows are paired
by ``study_hash``, never by row order) and agree on each study's known flags and known labels.

Per finding, over the studies whose label is known: the AUC of A and of B, the difference B - A, DeLong's test
for two correlated ROC curves (DeLong, DeLong & Clarke-Pearson 1988, Biometrics 44:837; computed with the
midrank algorithm of Sun & Xu 2014, IEEE Signal Processing Letters 21:1389) giving the difference's standard
error, a 95% normal CI and a two-sided p-value, Holm's adjustment of those p-values across the findings
tested, and with ``bootstrap`` a paired study-level percentile CI of the difference (each resample draws
studies once for both models). Writes compare.parquet (per finding), compare.md and summary.json.

Holm rather than Benjamini-Hochberg: a paper's sentence "B is better on finding X" is a claim about each
finding, and Holm bounds the chance of any false such claim (familywise error) under any dependence between
the tests, which are strongly dependent here (the same studies, models and correlated findings such as the
hemorrhage subtypes); Benjamini-Hochberg bounds the expected share of false claims only, and only under
independence or positive dependence, which two-sided tests of correlated findings do not guarantee.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from molre import __version__
from molre.data import storage
from molre.errors import ConfigError, DataError
from molre.findings import FINDING_IDS, FINDINGS
from molre.train import operating_points as op

log = logging.getLogger(__name__)

FORMAT = "molre-compare/1"
ALPHA = 0.05  # a finding is significantly better / worse when its Holm-adjusted p <= ALPHA
LEVEL = 0.95  # the CIs' level (DeLong's normal CI and the bootstrap percentile CI)
SCORES, SUMMARY = "scores.parquet", "summary.json"  # what evaluate writes and compare reads
# what summary.json keeps of each evaluation's own summary.json: what was scored, by which model, how
PROVENANCE = (
    "checkpoint", "checkpoint_given", "data", "split", "manifest_sha256", "training_dataset_sha256",
    "molre_version", "device", "precision", "trained_sha256", "frozen_sha256", "preprocessing", "volumes",
    "mean_auc",
)  # fmt: skip
REFUSALS = (
    "the two folders hold summary.json files of different data (manifest_sha256) or of different splits",
    "their scores.parquet files hold different sets of studies (study_hash), or one holds a study twice",
    "a study's known flags differ between them, or a known label does (labels under known = 0 are not "
    "compared: they mean nothing)",
    "a scores.parquet is not evaluate's (columns, 75 values per list, finding ids in its metadata) or holds "
    "a non-finite score for a known label",
    "--out is one of the two evaluation folders (its summary.json would be overwritten), or --names gives "
    "one name twice",
)


# ---- reading and pairing two evaluations ------------------------------------------------------------------


class Evaluation(NamedTuple):
    """One ``molre evaluate`` output folder as compare reads it; matrices [N, C] in ``FINDING_IDS`` order."""

    folder: str
    summary: dict  # its summary.json
    scores_sha256: str  # of its scores.parquet's bytes (recorded in compare's summary.json)
    studies: np.ndarray  # [N] study_hash, str
    scores: np.ndarray  # [N, C] float64
    labels: np.ndarray  # [N, C] uint8 0/1
    known: np.ndarray  # [N, C] uint8 0/1 (0: the label is unknown)


def read_evaluation(folder: str) -> Evaluation:
    """The evaluation at ``folder``: a DataError naming the folder (or file) when it is none."""
    folder = str(folder).rstrip("/")
    if not storage.exists(folder):
        raise DataError(folder, "no such evaluation folder (molre evaluate's --out)")
    summary = _read_summary(folder)
    blob = _read(folder, SCORES)
    studies, scores, labels, known = _read_scores(storage.join(folder, SCORES), blob)
    return Evaluation(folder, summary, storage.sha256_bytes(blob), studies, scores, labels, known)


def _read(folder: str, name: str) -> bytes:
    try:
        return storage.read_bytes(storage.join(folder, name))
    except FileNotFoundError:
        raise DataError(folder, f"no {name}: not a molre evaluate output folder") from None
    except storage.StorageError as err:  # locally, a folder where the file should be: IsADirectoryError
        raise DataError(folder, f"{name} cannot be read ({err})") from None


def _read_summary(folder: str) -> dict:
    try:
        summary = json.loads(_read(folder, SUMMARY))
    except ValueError as err:
        raise DataError(storage.join(folder, SUMMARY), f"not a JSON file ({err})") from None
    missing = [
        key for key in ("manifest_sha256", "split") if not isinstance(summary, dict) or key not in summary
    ]
    if missing:
        uri = storage.join(folder, SUMMARY)
        raise DataError(uri, f"records no {' / '.join(missing)}: not the summary.json of molre evaluate")
    return summary


def _read_scores(uri: str, blob: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(study_hash [N], scores [N, C] float64, labels [N, C] uint8, known [N, C] uint8) of scores.parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(blob))
    except pa.ArrowException as err:
        raise DataError(uri, f"not a Parquet file ({err})") from None
    missing = [c for c in ("study_hash", "scores", "labels", "known") if c not in table.column_names]
    if missing:
        raise DataError(uri, f"no column {', '.join(missing)}: not the scores.parquet of molre evaluate")
    ids = (table.schema.metadata or {}).get(b"molre.finding_ids")
    if ids is not None and ids.decode().split(",") != list(FINDING_IDS):
        raise DataError(uri, f"scored another finding list than this molre's {len(FINDING_IDS)} (its "
                             "molre.finding_ids metadata): its columns are not these findings")  # fmt: skip
    studies = np.asarray(table["study_hash"].to_pylist(), dtype=object)
    scores, labels, known = (_matrix(table, name, uri) for name in ("scores", "labels", "known"))
    if not np.isfinite(scores[known.astype(bool)]).all():
        raise DataError(uri, "a score of a known label is NaN or infinite")
    return studies, scores.astype(np.float64), labels.astype(np.uint8), known.astype(np.uint8)


def _matrix(table, name: str, uri: str) -> np.ndarray:
    """Column ``name`` (a list of len(FINDING_IDS) values per study) as an [N, C] array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table[name].combine_chunks()
    if not pa.types.is_list(column.type) and not pa.types.is_fixed_size_list(column.type):
        raise DataError(uri, f"column {name} is {column.type}, not a list per study")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if column.null_count or (lengths != len(FINDING_IDS)).any():
        raise DataError(uri, f"column {name}: not {len(FINDING_IDS)} values for every study")
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), len(FINDING_IDS))


def check_same_data(a: Evaluation, b: Evaluation) -> None:
    """Both scored the same data (manifest sha256: the same shards, wherever they lie) and split."""
    for key, what in (("manifest_sha256", "data"), ("split", "split")):
        if a.summary[key] != b.summary[key]:
            raise DataError(b.folder, f"scored other {what} than {a.folder} ({key} {b.summary[key]} vs "
                                      f"{a.summary[key]}): a paired comparison needs the same studies; "
                                      "evaluate both checkpoints on the same data and split")  # fmt: skip


def align(a: Evaluation, b: Evaluation) -> Evaluation:
    """``b`` with its rows in ``a``'s study order (matched by study_hash). A DataError when either holds a
    study twice or the two hold different studies."""
    for side in (a, b):
        if len(set(side.studies)) != len(side.studies):
            twice = pd.Series(side.studies).value_counts()
            repeated = _few(list(twice.index[twice > 1]))
            raise DataError(side.folder, f"scores.parquet holds {repeated} study_hash(es) more than once: "
                                         "its studies cannot be paired")  # fmt: skip
    only_a, only_b = sorted(set(a.studies) - set(b.studies)), sorted(set(b.studies) - set(a.studies))
    if only_a or only_b:
        raise DataError(b.folder, f"scored other studies than {a.folder}: {_few(only_a)} only in the "
                                  f"latter, {_few(only_b)} only here; a paired comparison needs the same "
                                  "studies (the same data, split and a complete evaluation)")  # fmt: skip
    rows = pd.Index(b.studies).get_indexer(a.studies)  # b's row of each of a's studies
    return b._replace(
        studies=b.studies[rows], scores=b.scores[rows], labels=b.labels[rows], known=b.known[rows]
    )


def check_same_labels(a: Evaluation, b: Evaluation) -> None:
    """After ``align``: the same known flags, and the same label wherever it is known (labels under
    known = 0 are placeholders and not compared)."""
    differs = (a.known != b.known) | ((a.known == 1) & (a.labels != b.labels))  # [N, C]
    if differs.any():
        rows, cols = np.nonzero(differs)
        first = f"study {a.studies[rows[0]]}, finding {FINDING_IDS[cols[0]]}"
        raise DataError(b.folder, f"labels disagree with {a.folder} on {int(differs.any(1).sum())} studies "
                                  f"({int(differs.sum())} labels or known flags; first: {first}): they "
                                  "were not scored against the same ground truth")  # fmt: skip


def _few(items: list, shown: int = 3) -> str:
    if not items:
        return "none"
    return f"{len(items)} ({', '.join(map(str, items[:shown]))}{', ...' if len(items) > shown else ''})"


# ---- DeLong's test ----------------------------------------------------------------------------------------


def midranks(x: np.ndarray) -> np.ndarray:
    """[n] ranks 1..n of ``x`` [n], tied values sharing the mean of their ranks (O(n log n): one sort).
    A value v with c copies and e values <= v holds ranks e - c + 1 .. e, whose mean is e - (c - 1) / 2."""
    values, inverse, copies = np.unique(x, return_inverse=True, return_counts=True)
    at_most = np.cumsum(copies)  # e per distinct value
    return (at_most - (copies - 1) / 2)[inverse.reshape(-1)]


def delong_covariance(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs [k], their covariance [k, k]) of k models scoring the same m positives (``positives`` [k, m])
    and n negatives (``negatives`` [k, n]); needs m, n >= 2.

    DeLong et al. 1988: with psi(x, y) = 1 if x > y, 1/2 if x = y, 0 otherwise, model r's AUC is
    theta_r = (1 / mn) sum_i sum_j psi(X_ri, Y_rj); its structural components are V10_r(i) = (1/n) sum_j
    psi(X_ri, Y_rj) per positive and V01_r(j) = (1/m) sum_i psi(X_ri, Y_rj) per negative (both average to
    theta_r), and Cov(theta) = S10 / m + S01 / n with S10, S01 the [k, k] sample covariances (divisor m - 1,
    n - 1) of the components across positives and across negatives (``structural_components``)."""
    aucs, v10, v01 = structural_components(positives, negatives)
    return aucs, _sample_cov(v10) / v10.shape[1] + _sample_cov(v01) / v01.shape[1]


def structural_components(positives: np.ndarray, negatives: np.ndarray):
    """(theta [k], V10 [k, m], V01 [k, n]) of ``delong_covariance``, from midranks in O((m + n) log(m + n))
    (Sun & Xu 2014) instead of the m x n comparisons: with Tz the midranks among all m + n scores of a model,
    Tx among its positives, Ty among its negatives, a positive's Tz - Tx counts the negatives below it plus
    half those tied with it (the positives below or tied with it count in both and cancel), so
    V10(i) = (Tz_i - Tx_i) / n; a negative's Tz - Ty counts the positives below it plus half those tied, the
    complement of what V01 counts, so V01(j) = 1 - (Tz_j - Ty_j) / m; and theta = mean_i V10(i)
    = (sum_i Tz_i - sum_i Tx_i) / (mn) = (sum_i Tz_i - m (m + 1) / 2) / (mn)."""
    positives, negatives = np.atleast_2d(positives), np.atleast_2d(negatives)
    m, n = positives.shape[1], negatives.shape[1]
    both = np.concatenate([positives, negatives], axis=1)  # [k, m + n]: the positives first
    tz = np.stack([midranks(row) for row in both])  # [k, m + n]
    tx = np.stack([midranks(row) for row in positives])  # [k, m]
    ty = np.stack([midranks(row) for row in negatives])  # [k, n]
    v10 = (tz[:, :m] - tx) / n  # [k, m]
    v01 = 1.0 - (tz[:, m:] - ty) / m  # [k, n]
    aucs = (tz[:, :m].sum(1) - m * (m + 1) / 2) / (m * n)  # [k]
    return aucs, v10, v01


def _sample_cov(v: np.ndarray) -> np.ndarray:
    """[k, k] sample covariance of the rows of ``v`` [k, s]: sum_i (v_i - mean)(v_i - mean)^T / (s - 1)."""
    centered = v - v.mean(1, keepdims=True)
    return centered @ centered.T / (v.shape[1] - 1)


class PairedTest(NamedTuple):
    """DeLong's test of AUC_B - AUC_A on one finding; NaN fields come with a ``reason``."""

    auc_a: float
    auc_b: float
    diff: float  # AUC_B - AUC_A
    se: float  # sqrt(Var(AUC_B - AUC_A))
    z: float  # diff / se
    p: float  # two-sided: 2 (1 - Phi(|z|))
    ci_low: float  # diff -+ Phi^-1((1 + LEVEL) / 2) se
    ci_high: float
    reason: str | None


def delong_test(pos_a, neg_a, pos_b, neg_b, level: float = LEVEL) -> PairedTest:
    """DeLong's test for two models' scores of the same positives (``pos_a``, ``pos_b``: [m], study for study)
    and negatives (``neg_a``, ``neg_b``: [n]). With L = (-1, 1) and S the covariance of (AUC_A, AUC_B):
    Var(diff) = L S L^T = S_AA + S_BB - 2 S_AB, z = diff / sqrt(Var), p = 2 (1 - Phi(|z|)).

    Defined as: NaN everything when a class is missing; AUCs and difference but NaN se / p with fewer than
    2 positives or 2 negatives (a sample covariance needs 2); se = 0 and p = 1 when Var = 0 and diff = 0,
    as when both models rank the studies alike (identical models, or one a monotone transform of the other:
    the components depend only on ranks) or both separate the classes perfectly; NaN z / p when Var = 0
    but diff != 0 (too few studies for a test)."""
    from scipy.stats import norm  # ~0.3 s: only when something is compared

    m, n = len(pos_a), len(neg_a)
    if not m or not n:
        return PairedTest(*(math.nan,) * 8, "no positive" if not m else "no negative")
    if m < 2 or n < 2:  # theta is defined, its variance is not
        aucs = structural_components(np.stack([pos_a, pos_b]), np.stack([neg_a, neg_b]))[0].tolist()
        one = "positive" if m < 2 else "negative"
        return PairedTest(*aucs, aucs[1] - aucs[0], *(math.nan,) * 5,
                          f"1 known {one}: DeLong's variance needs >= 2 of each class")  # fmt: skip
    aucs, cov = delong_covariance(np.stack([pos_a, pos_b]), np.stack([neg_a, neg_b]))
    auc_a, auc_b = aucs.tolist()
    diff = auc_b - auc_a
    var = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)  # rounding may dip below 0 near 0
    if var == 0.0 and diff == 0.0:
        return PairedTest(auc_a, auc_b, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, None)
    if var == 0.0:
        return PairedTest(auc_a, auc_b, diff, 0.0, *(math.nan,) * 4,
                          "DeLong variance 0 with a nonzero difference: too few studies to test")  # fmt: skip
    se = math.sqrt(var)
    z = diff / se
    half = float(norm.ppf((1 + level) / 2)) * se  # 1.96 se at 95%
    return PairedTest(auc_a, auc_b, diff, se, z, float(2 * norm.sf(abs(z))), diff - half, diff + half, None)


def holm(p) -> np.ndarray:
    """Holm's step-down adjusted p-values [C]; NaN (not tested) stays NaN. Of the t tested, sorted
    p_(1) <= ... <= p_(t): adj_(i) = max_{j <= i} min(1, (t - j + 1) p_(j)). adj_(i) <= alpha is exactly
    Holm's rejection of H_(i) at familywise level alpha (under any dependence between the tests)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]  # indices of p_(1), ..., p_(t)
    scaled = np.minimum(1.0, (len(order) - np.arange(len(order))) * p[order])  # (t - j + 1) p_(j)
    out[order] = np.maximum.accumulate(scaled) if len(order) else scaled
    return out


# ---- per finding and over findings ------------------------------------------------------------------------


def finding_tests(a: Evaluation, b: Evaluation) -> list[PairedTest]:
    """``delong_test`` of each finding over its known labels (``a``, ``b`` aligned, labels agreeing)."""
    out = []
    for c in range(len(FINDING_IDS)):
        keep = a.known[:, c].astype(bool)
        pos = keep & a.labels[:, c].astype(bool)
        neg = keep & ~a.labels[:, c].astype(bool)
        test = delong_test(a.scores[pos, c], a.scores[neg, c], b.scores[pos, c], b.scores[neg, c])
        if test.reason in ("no positive", "no negative"):
            test = test._replace(reason=f"{test.reason} among the {int(keep.sum())} known labels")
        out.append(test)
    return out


def bootstrap_difference(
    a: Evaluation, b: Evaluation, whole: np.ndarray, n_boot: int, seed: int = 0, level: float = LEVEL
) -> tuple[np.ndarray, np.ndarray, list[float] | None]:
    """Paired percentile CIs of AUC_B - AUC_A per finding [C] and of its mean over the findings whose
    difference on all the studies, ``whole`` [C], is defined (``op.percentile_cis``): ``n_boot`` resamples of
    the studies (``op.study_resamples``, seeded), each weighting both models' studies alike, so the
    difference's spread carries their correlation. A resample lacking a class for a finding leaves that
    finding out of it. Each AUC is the weighted Mann-Whitney count behind evaluate's AUC CIs
    (``op.weighted_auc``)."""

    def diffs(counts: np.ndarray) -> np.ndarray:  # [b, C]: one row per resample of counts [b, N]
        columns = [
            op.weighted_auc(b.scores[:, c], b.labels[:, c], b.known[:, c], counts)
            - op.weighted_auc(a.scores[:, c], a.labels[:, c], a.known[:, c], counts)
            for c in range(len(FINDING_IDS))
        ]
        return np.stack(columns, axis=1)

    boot = np.concatenate([diffs(counts) for counts in op.study_resamples(len(a.studies), n_boot, seed)])
    return op.percentile_cis(boot, whole, level)


def finding_table(a: Evaluation, b: Evaluation, alpha: float = ALPHA) -> pd.DataFrame:
    """One row per finding: known / positive / negative counts, both AUCs, B - A (``diff``), DeLong's se, z,
    p and CI, Holm's p (``p_holm``), ``verdict`` (better / worse: B than A at Holm-adjusted p <= alpha; ''
    otherwise) and the ``reason`` of a missing test."""
    tests = finding_tests(a, b)
    keep = a.known.astype(bool)
    positives = (keep & a.labels.astype(bool)).sum(0)
    table = pd.DataFrame({
        "finding": FINDING_IDS, "name": [f.name for f in FINDINGS],
        "category": [f.category for f in FINDINGS], "n_known": keep.sum(0), "positives": positives,
        "negatives": keep.sum(0) - positives,
    })  # fmt: skip
    for field in PairedTest._fields:
        table[field] = [getattr(t, field) for t in tests]
    table["p_holm"] = holm(table["p"])
    significant = table["p_holm"] <= alpha  # NaN compares False
    table["verdict"] = np.where(significant & (table["diff"] > 0), "better",
                                np.where(significant & (table["diff"] < 0), "worse", ""))  # fmt: skip
    return table[[c for c in table.columns if c != "reason"] + ["reason"]]


def summarize(table: pd.DataFrame) -> dict:
    """Over the findings both models have an AUC for: the mean of each and of B - A, how often B is higher /
    lower / equal, which findings B is significantly better / worse on (Holm), and why the others have no
    test."""
    paired = table[table["diff"].notna()]
    means = {
        f"mean_{c}": float(paired[c].mean()) if len(paired) else math.nan for c in ("auc_a", "auc_b", "diff")
    }
    return {
        "findings": len(table), "compared": len(paired), "tested": int(table["p"].notna().sum()), **means,
        "b_higher": int((paired["diff"] > 0).sum()), "b_lower": int((paired["diff"] < 0).sum()),
        "equal": int((paired["diff"] == 0).sum()),
        "significantly_better": table.loc[table["verdict"] == "better", "finding"].tolist(),
        "significantly_worse": table.loc[table["verdict"] == "worse", "finding"].tolist(),
        "no_test": {row.finding: row.reason for row in table.itertuples() if isinstance(row.reason, str)},
    }  # fmt: skip


# ---- the command ------------------------------------------------------------------------------------------


def compare(
    eval_a: str,
    eval_b: str,
    out_dir: str | None = None,
    bootstrap: int = 0,
    names: tuple[str, str] = ("A", "B"),
) -> dict:
    """Compare the evaluations in folders ``eval_a`` and ``eval_b`` (refusals: module docstring, REFUSALS);
    write compare.parquet, compare.md and summary.json to ``out_dir`` (default ``EVAL_B/compare-<the first 12
    hex of EVAL_A's scores.parquet sha256>``: one folder per baseline, under the evaluation judged against
    it). Returns summary.json's content and ``out_dir``."""
    if bootstrap < 0:
        raise ConfigError(f"bootstrap: {bootstrap} resamples; give 0 (no CIs) or more")
    if len(names) != 2 or names[0] == names[1]:
        raise ConfigError(f"names: {list(names)}; give two different names, A's then B's")
    a, b = read_evaluation(eval_a), read_evaluation(eval_b)
    out = str(out_dir or storage.join(b.folder, f"compare-{a.scores_sha256[:12]}")).rstrip("/")
    for side in (a, b):
        if _same_place(out, side.folder):
            raise ConfigError(f"out: {out} is the evaluation folder {side.folder}; its summary.json would be "
                              "overwritten: give another --out")  # fmt: skip
    check_same_data(a, b)
    b = align(a, b)
    check_same_labels(a, b)
    if a.summary.get("trained_sha256") and a.summary.get("trained_sha256") == b.summary.get("trained_sha256"):
        log.warning("compare: %s and %s are evaluations of the same trained weights", a.folder, b.folder)
    table = finding_table(a, b)
    mean_ci = None
    if bootstrap:
        table["boot_ci_low"], table["boot_ci_high"], mean_ci = bootstrap_difference(
            a, b, table["diff"].to_numpy(), bootstrap
        )
    result = _result(a, b, table, names, bootstrap, mean_ci)
    files = {"compare.parquet": _parquet(table), "compare.md": _markdown(table, result).encode(),
             "summary.json": op.json_bytes(result)}  # fmt: skip
    for name, blob in files.items():
        storage.write_bytes(storage.join(out, name), blob)
    return {**result, "out_dir": out}


def _result(a: Evaluation, b: Evaluation, table: pd.DataFrame, names, bootstrap: int, mean_ci) -> dict:
    """summary.json: what was compared, ``summarize``'s figures, how, and both evaluations' provenance."""
    return {
        "format": FORMAT, "names": {"a": names[0], "b": names[1]}, "difference": "B - A",
        "split": a.summary["split"], "manifest_sha256": a.summary["manifest_sha256"],
        "studies": len(a.studies), **summarize(table), "mean_diff_ci": mean_ci,
        "test": "DeLong 1988, Sun & Xu 2014 midranks; two-sided", "adjustment": "holm", "alpha": ALPHA,
        "level": LEVEL,
        "bootstrap": {"resamples": bootstrap, "unit": "study", "paired": True, "seed": 0} if bootstrap
        else None,
        "molre_version": __version__,
        "a": _provenance(a), "b": _provenance(b),
    }  # fmt: skip


def _provenance(side: Evaluation) -> dict:
    return {"folder": side.folder, "scores_sha256": side.scores_sha256,
            **{key: side.summary[key] for key in PROVENANCE if key in side.summary}}  # fmt: skip


def _same_place(x: str, y: str) -> bool:
    if storage.is_s3(x) or storage.is_s3(y):
        return x.rstrip("/") == y.rstrip("/")
    return Path(x).resolve() == Path(y).resolve()


def _parquet(table: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _markdown(table: pd.DataFrame, result: dict) -> str:
    na, nb = result["names"]["a"], result["names"]["b"]
    lines = _markdown_header(result, na, nb) + _markdown_table(table, na, nb) + _markdown_method(result)
    return "\n".join(lines) + "\n"


def _markdown_header(result: dict, na: str, nb: str) -> list[str]:
    a, b = result["a"], result["b"]
    ci = result["mean_diff_ci"]
    interval = f" (95% CI {ci[0]:+.4f} to {ci[1]:+.4f}, paired study bootstrap)" if ci else ""
    better, worse = result["significantly_better"], result["significantly_worse"]
    return [
        f"# {nb} vs {na} ({result['split']}, {result['studies']} studies)",
        "",
        f"- {na} (A): `{a['folder']}`, checkpoint `{a.get('checkpoint')}`",
        f"- {nb} (B): `{b['folder']}`, checkpoint `{b.get('checkpoint')}`",
        f"- data `{a.get('data')}` (manifest sha256 {result['manifest_sha256'][:12]}...), split "
        f"{result['split']}; the studies paired by study_hash",
        "",
        f"Mean AUC {_num(result['mean_auc_a'])} ({na}) vs {_num(result['mean_auc_b'])} ({nb}), difference "
        f"{_num(result['mean_diff'], signed=True)}{interval} over the {result['compared']} findings with "
        f"both classes. {nb} higher on {result['b_higher']}, lower on {result['b_lower']}, equal on "
        f"{result['equal']}. Over the {result['tested']} findings tested, Holm-adjusted p <= {ALPHA}: "
        f"significantly better on {len(better)}{_listed(better)}, significantly worse on "
        f"{len(worse)}{_listed(worse)}.",
    ]


def _markdown_table(table: pd.DataFrame, na: str, nb: str) -> list[str]:
    boot = "boot_ci_low" in table
    head = f"| finding | category | known | pos | neg | AUC {na} | AUC {nb} | {nb} - {na} | 95% CI (DeLong) |"
    head += (" 95% CI (bootstrap) |" if boot else "") + " p | p (Holm) | verdict |"
    lines = [
        "",
        head,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if boot else "") + "---:|---:|---|",
    ]
    for row in table.itertuples():
        cells = [row.name, row.category, row.n_known, row.positives, row.negatives, _num(row.auc_a),
                 _num(row.auc_b), _num(row.diff, signed=True),
                 _interval(row.ci_low, row.ci_high)]  # fmt: skip
        if boot:
            cells.append(_interval(row.boot_ci_low, row.boot_ci_high))
        verdict = {"better": f"{nb} better", "worse": f"{nb} worse"}.get(row.verdict, "")
        reason = f"no test: {row.reason}" if isinstance(row.reason, str) else ""  # missing: NaN in pandas
        cells += [_p(row.p), _p(row.p_holm), reason or verdict]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def _markdown_method(result: dict) -> list[str]:
    boot = result["bootstrap"]
    resampled = ""
    if boot:
        resampled = (
            f" The bootstrap CIs: {boot['resamples']} resamples of the studies with replacement (seed 0), "
            "each weighting both models' studies alike; percentile intervals."
        )
    return [
        "",
        "## Method",
        "",
        "Per finding, over the studies whose label is known: DeLong's test for two correlated ROC curves "
        "(DeLong, DeLong & Clarke-Pearson 1988; midrank computation of Sun & Xu 2014), two-sided, with its "
        "normal 95% CI of the difference; p-values adjusted across the findings tested by Holm's method "
        "(familywise error, valid under any dependence between findings). A finding without both classes "
        "has no AUC; one with a single positive or negative has AUCs but no test; two models ranking the "
        f"studies alike have difference 0 and p = 1.{resampled}",
        "",
        "## Refused when",
        "",
        *(f"- {condition}" for condition in REFUSALS),
    ]


def _num(value, digits: int = 4, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(low, high) -> str:
    return "-" if not math.isfinite(low) else f"{low:+.4f} to {high:+.4f}"


def _p(value) -> str:
    return "-" if not math.isfinite(value) else f"{value:.2g}"


def _listed(ids: list[str], shown: int = 10) -> str:
    return f" ({', '.join(ids[:shown])}{', ...' if len(ids) > shown else ''})" if ids else ""


# ---- CLI --------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "eval_a", metavar="EVAL_A", help="molre evaluate output folder of model A (local or s3://)"
    )
    parser.add_argument("eval_b", metavar="EVAL_B", help="the same of model B; differences are B - A")
    parser.add_argument(
        "--out",
        help="output folder, local or s3:// (default: EVAL_B/compare-<the first 12 hex of EVAL_A's "
        "scores.parquet sha256>); compare.parquet, compare.md and summary.json there are overwritten",
    )
    parser.add_argument(
        "--bootstrap", type=int, default=0, metavar="N",
        help="paired 95%% CIs of each difference and of the mean difference from N study-level resamples "
        "(default 0: DeLong's CIs only)",
    )  # fmt: skip
    parser.add_argument("--names", nargs=2, default=["A", "B"], metavar=("A", "B"),
                        help="what to call the two models in the outputs (default: A B)")  # fmt: skip


def run(args) -> int:
    result = compare(args.eval_a, args.eval_b, args.out, args.bootstrap, tuple(args.names))
    print(summary_line(result))
    return 0


def summary_line(result: dict) -> str:
    """The CLI's line: both means, the difference (+ CI), wins / losses, the significant findings' counts."""
    na, nb = result["names"]["a"], result["names"]["b"]
    if not result["compared"]:
        return (f"{nb} vs {na}: no finding has both classes among the known labels of the "
                f"{result['studies']} studies; written to {result['out_dir']}")  # fmt: skip
    ci = result["mean_diff_ci"]
    interval = f", 95% CI {ci[0]:+.4f} to {ci[1]:+.4f}" if ci else ""
    return (
        f"mean AUC {na} {result['mean_auc_a']:.4f}, {nb} {result['mean_auc_b']:.4f} ({nb} - {na} "
        f"{result['mean_diff']:+.4f}{interval}) over {result['compared']} findings on {result['studies']} "
        f"studies; {nb} higher on {result['b_higher']}, lower on {result['b_lower']}; Holm p <= {ALPHA}: "
        f"{nb} better on {len(result['significantly_better'])}, worse on "
        f"{len(result['significantly_worse'])}; written to {result['out_dir']}"
    )
