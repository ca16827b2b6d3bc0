"""Ablation leaderboards: a sweep's trials table -> Parquet/CSV, Markdown and a self-contained HTML report.

``molre leaderboard EXPERIMENT_URI [--out URI]`` regenerates them from ``<experiment>/trials.parquet``; the sweep
driver calls ``write_leaderboard`` as trials finish and at the end. Local paths and s3:// URIs both work.

Vocabulary
- trial: one row of the table (one config, one seed).
- setting: one point of the search space with the seed left out; its trials are its seeds.
- side: LoRA only (``adapter.kind == "none"``, the paper's "Base") or LoRA + MoLRE (``"molre"``).

For every backbone and side the report uses the best setting, ranked by the mean over its seeds of the
objective (validation mean AUC at the best epoch). Per-finding AUCs are first averaged over that setting's
seeds, then summarised across findings (mean +- std, counts >= 0.90 and 0.80-0.90), as in the paper's Table 2
and Fig. 2. All numbers are validation numbers, and picking the best of many settings on the same validation
set flatters the side that had more settings tried; the report says so next to the numbers.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from molre.data import storage
from molre.errors import MolreError
from molre.findings import CATEGORY_NAMES, FINDING_IDS, FINDINGS
from molre.tune import plots
from molre.tune.report import Block, Bullets, Heading, Image, Table, Text, render_html, render_markdown

TRIALS_FILE = "trials.parquet"
OBJECTIVE = "val/best_mean_auc"
PRESET, KIND, SEED = "config/backbone.preset", "config/adapter.kind", "config/train.seed"
MOLRE_KEYS = "config/adapter.molre."  # prefix of the settings that only matter when adapter.kind == "molre"
LORA, MOLRE = "none", "molre"  # adapter.kind values
SIDE_NAMES = {LORA: "LoRA", MOLRE: "+MoLRE"}
N_BOOTSTRAP = 2000  # bootstrap resamples over findings for the 95% CI
MIN_PAIRED = 5  # fewer paired findings than this: no CI, no test
MIN_TRIALS_FOR_IMPORTANCE = 4
TOP_ROWS = 25  # ranking rows shown in the Markdown/HTML (trials.csv has them all)
BANDS = (">= 0.90", "0.80-0.90")  # paper Fig. 2: AUC >= 0.90 and 0.80 <= AUC < 0.90
_ROUTER_USAGE = re.compile(r"^router/usage/(?P<category>[^/]+)/(?P<k>\d+)$")


# ---- reading the table -------------------------------------------------------------------------------------


def load_trials(experiment_uri: str) -> pd.DataFrame:
    """The trials table the sweep driver writes at ``<experiment>/trials.parquet`` (local path or s3://)."""
    uri = storage.join(experiment_uri, TRIALS_FILE)
    if not storage.exists(uri):
        raise MolreError(f"{uri}: no trials table (has the sweep finished or reported any trial yet?)")
    return pd.read_parquet(io.BytesIO(storage.read_bytes(uri)))


def _plain(value: object) -> object:
    """A hashable, JSON-able Python value for a table cell: NaN/NA -> None, numpy scalars -> Python, lists -> JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str, sort_keys=True)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA or value is pd.NaT:
        return None
    return value


def _column(trials: pd.DataFrame, name: str) -> pd.Series:
    """A column, or an all-NaN one when the table lacks it (empty or partial tables)."""
    return trials[name] if name in trials else pd.Series(np.nan, index=trials.index, dtype=float)


def _numeric(trials: pd.DataFrame, name: str) -> pd.Series:
    return pd.to_numeric(_column(trials, name), errors="coerce").astype(float)


def finished_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """TERMINATED trials with a finite objective (ERROR/RUNNING/PENDING rows and NaN objectives are left out)."""
    ok = (_column(trials, "status").astype(object) == "TERMINATED") & np.isfinite(_numeric(trials, OBJECTIVE))
    return trials[ok.to_numpy(dtype=bool)]


def comparison_pool(finished: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The trials the Table-2 comparisons use: those that ran to their end. ASHA-stopped trials carry the
    objective of a shorter run, so they are ranked but kept out, unless nothing else finished."""
    stopped = _column(finished, "stopped_early").fillna(False).astype(bool).to_numpy()
    if stopped.any() and not stopped.all():
        note = f"{int(stopped.sum())} trial(s) stopped early by ASHA are ranked but not compared."
        return finished[~stopped], note
    if stopped.any():
        return finished, "Every finished trial was stopped early by ASHA: comparisons use these short runs."
    return finished, ""


def searched_keys(trials: pd.DataFrame) -> list[str]:
    """The dotted keys the sweep searched over (JSON list in the ``searched`` column, same on every row)."""
    for raw in _column(trials, "searched").dropna():
        keys = json.loads(raw) if isinstance(raw, str) else list(raw)
        if keys:
            return [str(k) for k in keys]
    return []


def auc_matrix(trials: pd.DataFrame) -> pd.DataFrame:
    """``[trials, 75]`` per-finding AUCs in taxonomy order; NaN = undefined (or missing column)."""
    return pd.DataFrame({fid: _numeric(trials, f"auc/{fid}") for fid in FINDING_IDS}, index=trials.index)


def _varying(trials: pd.DataFrame, columns: Iterable[str]) -> list[str]:
    return [c for c in columns if c in trials and len({_plain(v) for v in trials[c]}) > 1]


def _config_columns(trials: pd.DataFrame) -> list[str]:
    return [c for c in trials.columns if str(c).startswith("config/")]


def _short(column: str) -> str:
    return column.removeprefix("config/").replace("adapter.molre.", "molre.")


# ---- settings (a config without its seed) ------------------------------------------------------------------


@functools.cache
def _preset_meta() -> tuple[tuple[str, ...], dict[str, str]]:
    """Paper preset order and each preset's Domain (imports the model registry, hence torch, lazily)."""
    from molre.models.backbones import PAPER_PRESETS, PRESETS

    return tuple(PAPER_PRESETS), {name: p.domain for name, p in PRESETS.items()}


def domain_of(preset: str) -> str:
    return _preset_meta()[1].get(preset, "?")


def preset_order(presets: Iterable[str]) -> list[str]:
    """The paper's order (Table 2) for its six presets, then any other preset alphabetically."""
    present = {str(p) for p in presets}
    paper = [p for p in _preset_meta()[0] if p in present]
    return paper + sorted(present - set(paper))


@dataclass
class Setting:
    preset: str
    kind: str  # "none" (LoRA) or "molre"
    params: dict[str, object]  # searched keys (short names, seed left out) -> value
    trials: pd.DataFrame  # one row per seed

    @property
    def side(self) -> str:
        return SIDE_NAMES.get(self.kind, self.kind)

    @property
    def n_seeds(self) -> int:
        return len(self.trials)

    @property
    def objective(self) -> float:
        return float(_numeric(self.trials, OBJECTIVE).mean())

    @property
    def seed_sd(self) -> float:
        """Spread of the objective across seeds (sample std); NaN with one seed."""
        values = _numeric(self.trials, OBJECTIVE)
        return float(values.std(ddof=1)) if len(values) > 1 else float("nan")

    @functools.cached_property
    def per_finding(self) -> pd.Series:
        """Per-finding AUC averaged over seeds; a finding undefined in some seeds is averaged over the others,
        and stays NaN only if no seed defines it."""
        return auc_matrix(self.trials).mean(axis=0, skipna=True)

    def auc_mean_std(self) -> tuple[float, float]:
        """Mean and (population) std across defined findings of the seed-averaged AUCs, like metrics.summarize."""
        defined = self.per_finding.dropna().to_numpy()
        return (float(defined.mean()), float(defined.std())) if defined.size else (math.nan, math.nan)

    def count(self, name: str) -> int | None:
        """A parameter count (``params/<name>``), the median over seeds (they are all equal in practice)."""
        values = _numeric(self.trials, f"params/{name}").dropna()
        return int(values.median()) if len(values) else None

    def best_trial(self) -> pd.Series:
        return self.trials.iloc[int(np.nanargmax(_numeric(self.trials, OBJECTIVE).to_numpy()))]


def _setting_columns(trials: pd.DataFrame) -> list[str]:
    """Columns that define a setting: the searched keys (else every varying config column), minus the seed."""
    searched = [f"config/{k}" for k in searched_keys(trials)]
    columns = searched if searched else _varying(trials, _config_columns(trials))
    return [c for c in dict.fromkeys([PRESET, KIND, *columns]) if c in trials and c != SEED]


def group_settings(trials: pd.DataFrame) -> list[Setting]:
    """Group trials into settings. LoRA trials ignore ``adapter.molre.*`` (it has no effect on them), so a
    grid that crosses the adapter kind with MoLRE options still gives LoRA one setting per seed set."""
    if trials.empty or PRESET not in trials or KIND not in trials:
        return []
    columns = _setting_columns(trials)
    groups: dict[str, list] = {}
    for position, row in enumerate(trials[columns].to_dict("records")):  # positions: the index may repeat
        kind = _plain(row[KIND])
        skip = kind == LORA
        params = {_short(c): _plain(v) for c, v in row.items() if not (skip and c.startswith(MOLRE_KEYS))}
        key = json.dumps(params, default=str, sort_keys=True)
        groups.setdefault(key, [params, []])[1].append(position)
    return [
        Setting(str(p.pop("backbone.preset")), str(p.pop("adapter.kind")), p, trials.iloc[rows])
        for p, rows in groups.values()
    ]


def best_settings(trials: pd.DataFrame) -> dict[tuple[str, str], Setting]:
    """``(preset, kind) -> Setting`` with the highest mean objective over seeds (ties: more seeds)."""
    best: dict[tuple[str, str], Setting] = {}
    for s in group_settings(trials):
        current = best.get((s.preset, s.kind))
        if current is None or (s.objective, s.n_seeds) > (current.objective, current.n_seeds):
            best[(s.preset, s.kind)] = s
    return best


# ---- formatting --------------------------------------------------------------------------------------------


def fmt_params(n: int | float | None) -> str:
    """Paper style: 86.6M, 0.59M; small (tiny test models) counts in K."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "-"
    n = float(n)
    if n >= 5e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e5:
        return f"{n / 1e6:.2f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else f"{int(n)}"


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_auc(setting: Setting | None) -> str:
    if setting is None:
        return "-"
    mean, std = setting.auc_mean_std()
    return "-" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _fmt_seeds(setting: Setting | None) -> str:
    if setting is None:
        return "-"
    sd = setting.seed_sd
    return f"{setting.n_seeds}" + ("" if math.isnan(sd) else f" (sd {sd:.3f})")


def _fmt_value(v: object) -> str:
    v = _plain(v)
    if v is None:
        return "None"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


# ---- 1. ranking --------------------------------------------------------------------------------------------


def ranking_table(finished: pd.DataFrame, top: int | None = None) -> pd.DataFrame:
    """Finished trials, best objective first, with the config columns that vary and the parameter counts."""
    ranked = finished.iloc[np.argsort(-_numeric(finished, OBJECTIVE).to_numpy(), kind="stable")]
    ranked = ranked if top is None else ranked.head(top)
    varying = [c for c in _varying(finished, _config_columns(finished)) if c not in (PRESET, KIND)]
    out = pd.DataFrame({"#": range(1, len(ranked) + 1), "trial": _column(ranked, "trial_id").astype(str)})
    out["backbone"] = _column(ranked, PRESET).astype(str).to_numpy()
    kinds = [_plain(k) for k in _column(ranked, KIND)]
    out["adapter"] = [SIDE_NAMES.get(k, str(k)) for k in kinds]
    for c in varying:  # MoLRE options are blank on LoRA rows: they have no effect there
        blank = c.startswith(MOLRE_KEYS)
        out[_short(c)] = [
            "" if blank and k == LORA else _fmt_value(v) for v, k in zip(ranked[c], kinds, strict=True)
        ]
    out["val mean AUC"] = [_fmt(v) for v in _numeric(ranked, OBJECTIVE)]
    out["std"] = [_fmt(v) for v in _numeric(ranked, "val/std_auc")]
    counts = {BANDS[0]: "val/n_auc_ge_090", BANDS[1]: "val/n_auc_080_090", "defined": "val/n_defined"}
    for label, col in counts.items():
        out[label] = [_fmt(v, 0) for v in _numeric(ranked, col)]
    out["epochs"] = [_fmt(v, 0) for v in _numeric(ranked, "epochs")]
    out["ASHA stop"] = ["yes" if _plain(v) is True else "" for v in _column(ranked, "stopped_early")]
    for label, name in (("trainable", "trainable"), ("MoLRE params", "molre")):
        out[label] = [fmt_params(v) for v in _numeric(ranked, f"params/{name}")]
    return out.reset_index(drop=True)


# ---- 2. Table 2 --------------------------------------------------------------------------------------------


def table2(best: dict[tuple[str, str], Setting]) -> pd.DataFrame:
    """Paper Table 2, one row per backbone; "-" where a side is missing (e.g. DeepCNTD has no MoLRE)."""
    rows = []
    for preset in preset_order(p for p, _ in best):
        lora, molre = best.get((preset, LORA)), best.get((preset, MOLRE))
        base = lora or molre
        total, molre_n = base.count("total"), molre.count("molre") if molre else None
        share = f"{100 * molre_n / total:.2f}%" if molre_n and total else "-"
        rows.append({
            "Model": preset, "Domain": domain_of(preset), "Total Params": fmt_params(total),
            "Base (LoRA) AUC": _fmt_auc(lora), "+MoLRE AUC": _fmt_auc(molre),
            "Trainable Params": fmt_params(base.count("trainable")), "MoLRE Params": fmt_params(molre_n),
            "MoLRE share": share, "LoRA seeds": _fmt_seeds(lora), "+MoLRE seeds": _fmt_seeds(molre),
        })  # fmt: skip
    return pd.DataFrame(rows)


def settings_table(best: dict[tuple[str, str], Setting]) -> pd.DataFrame:
    """Which setting each Table-2 cell comes from (searched keys that vary, seeds, trial ids)."""
    rows = []
    for preset in preset_order(p for p, _ in best):
        for kind in (LORA, MOLRE):
            s = best.get((preset, kind))
            if s is None:
                continue
            params = ", ".join(f"{k}={_fmt_value(v)}" for k, v in s.params.items()) or "(defaults)"
            rows.append({"Model": preset, "Side": s.side, "Setting": params, "Seeds": s.n_seeds,
                         "mean val AUC over seeds": _fmt(s.objective),
                         "trials": ", ".join(_column(s.trials, "trial_id").astype(str))})  # fmt: skip
    return pd.DataFrame(rows)


# ---- 3. MoLRE vs LoRA statistics ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    n: int  # findings with an AUC on both sides (the pairs)
    lora_mean: float  # mean AUC over the pairs (NaN when n == 0)
    molre_mean: float
    mean_diff: float  # mean over pairs of (MoLRE - LoRA) = molre_mean - lora_mean
    ci: tuple[float, float] | None  # bootstrap 95% CI of mean_diff; None when n < MIN_PAIRED
    p_value: float | None  # Wilcoxon signed-rank, two-sided; None when n < MIN_PAIRED
    wins: int  # pairs where MoLRE is higher
    verdict: str


def bootstrap_ci(diffs: np.ndarray, n_boot: int = N_BOOTSTRAP, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap CI of the mean: resample the findings with replacement ``n_boot`` times (seeded,
    so the report is reproducible) and take the 2.5/97.5 percentiles of the resampled means. The finding is
    the unit: this is uncertainty over which findings were measured, not over seeds or validation cases."""
    diffs = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(n_boot, diffs.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank test of "median difference = 0" across paired findings (no normality
    assumed; zero differences are dropped, scipy's default). All-zero differences: p = 1."""
    from scipy import stats

    diffs = np.asarray(diffs, dtype=float)
    if not np.any(diffs != 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.wilcoxon(diffs).pvalue)


def compare_findings(lora: pd.Series, molre: pd.Series, *, n_boot: int = N_BOOTSTRAP, seed: int = 0,
                     min_paired: int = MIN_PAIRED) -> Comparison:  # fmt: skip
    """MoLRE - LoRA over findings defined on both sides (each already averaged over seeds), paired by finding."""
    pairs = pd.concat([lora.rename("lora"), molre.rename("molre")], axis=1).dropna()
    diffs = (pairs["molre"] - pairs["lora"]).to_numpy(dtype=float)
    n, wins = int(diffs.size), int((diffs > 0).sum())
    means = [float(pairs[c].mean()) if n else math.nan for c in ("lora", "molre")]
    mean = float(diffs.mean()) if n else math.nan
    if n < min_paired:
        note = f"not enough data: {n} paired finding(s) < {min_paired}"
        return Comparison(n, *means, mean, None, None, wins, note)
    ci, p = bootstrap_ci(diffs, n_boot, seed), wilcoxon_p(diffs)
    if (ci[0] > 0 or ci[1] < 0) and p < 0.05:
        verdict = "MoLRE higher" if mean > 0 else "LoRA higher"
    else:
        verdict = "no clear difference"
    return Comparison(n, *means, mean, ci, p, wins, verdict)


def comparisons(best: dict[tuple[str, str], Setting]) -> dict[str, Comparison]:
    return {
        p: compare_findings(best[(p, LORA)].per_finding, best[(p, MOLRE)].per_finding)
        for p in preset_order(p for p, _ in best)
        if (p, LORA) in best and (p, MOLRE) in best
    }


def comparison_table(comps: dict[str, Comparison]) -> pd.DataFrame:
    rows = []
    for preset, c in comps.items():
        rows.append({
            "Model": preset, "paired findings": c.n, "LoRA mean AUC (pairs)": _fmt(c.lora_mean),
            "+MoLRE mean AUC (pairs)": _fmt(c.molre_mean),
            "mean diff (MoLRE - LoRA)": _fmt(c.mean_diff, signed=True),
            "95% CI (bootstrap)": "-" if c.ci is None else f"[{c.ci[0]:+.3f}, {c.ci[1]:+.3f}]",
            "Wilcoxon p": "-" if c.p_value is None else f"{c.p_value:.2g}",
            "MoLRE higher on": f"{c.wins}/{c.n}", "verdict": c.verdict,
        })  # fmt: skip
    return pd.DataFrame(rows)


# ---- 4. stratified counts ----------------------------------------------------------------------------------


def band_counts(aucs: pd.Series) -> tuple[int, int, int]:
    """(AUC >= 0.90, 0.80 <= AUC < 0.90, defined) over the defined findings, by metrics.band_counts (the rule
    of metrics.summarize, float noise on a threshold included)."""
    from molre.train.metrics import band_counts as auc_band_counts

    a = aucs.dropna().to_numpy(dtype=float)
    return (*auc_band_counts(a), int(a.size))


def stratified_counts(best: dict[tuple[str, str], Setting]) -> pd.DataFrame:
    """Rows: backbones; columns ``(band, side)``; counts over seed-averaged AUCs; NaN where a side is missing."""
    columns = pd.MultiIndex.from_product([[*BANDS, "defined"], list(SIDE_NAMES.values())])
    presets = preset_order(p for p, _ in best)
    out = pd.DataFrame(np.nan, index=pd.Index(presets, name="Model"), columns=columns)
    for (preset, _kind), s in best.items():
        high, moderate, defined = band_counts(s.per_finding)
        for band, value in zip((*BANDS, "defined"), (high, moderate, defined), strict=True):
            out.loc[preset, (band, s.side)] = value
    return out


def _counts_display(counts: pd.DataFrame) -> pd.DataFrame:
    flat = counts.copy()
    flat.columns = [f"{side} {band}" for band, side in counts.columns]
    return flat.map(lambda v: "-" if pd.isna(v) else str(int(v))).reset_index()


# ---- 6. hyperparameter importances -------------------------------------------------------------------------


def infer_distribution(values: Iterable[object]):
    """An Optuna distribution covering the observed values, or None when only one value occurs.
    Strings, bools and None-containing columns are categorical; numbers use their observed [min, max],
    on a log scale when the range spans more than two decades (max/min > 100, min > 0)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    plain = [_plain(v) for v in values]
    distinct = set(plain)
    if len(distinct) < 2:
        return None
    if any(v is None or isinstance(v, str | bool) for v in plain):
        return CategoricalDistribution(sorted(distinct, key=repr))
    low, high = min(plain), max(plain)
    log = low > 0 and high / low > 100
    if all(isinstance(v, int) for v in plain):
        return IntDistribution(int(low), int(high), log=log)
    return FloatDistribution(float(low), float(high), log=log)


def active_keys(row: pd.Series, searched: list[str]) -> set[str]:
    """The searched keys a trial was searched over: its ``active_keys`` (keys whose ``when`` condition held, as
    the sweep writes them); a table without that column: all of them, less adapter.molre.* on LoRA trials."""
    raw = _plain(row.get("active_keys"))
    if raw is not None:
        return set(json.loads(raw)) & set(searched)
    lora = _plain(row.get(KIND)) == LORA
    return {k for k in searched if not (lora and f"config/{k}".startswith(MOLRE_KEYS))}


def active_mask(finished: pd.DataFrame, searched: list[str]) -> np.ndarray:
    """``[trials, keys]`` bool: key j applied to trial i (its condition held)."""
    rows = [active_keys(row, searched) for _, row in finished.iterrows()]
    return np.array([[k in a for k in searched] for a in rows], dtype=bool).reshape(len(rows), len(searched))


def importance_study(finished: pd.DataFrame):
    """``(optuna Study | None, notes)``: the finished trials re-added to an in-memory study, one parameter
    per searched key that took more than one value among the trials it applied to. A trial carries only the
    keys whose condition held for it (Optuna's conditional parameters): a LoRA trial has no experts parameter,
    rather than posing as an experts=6 trial with the MoLRE default."""
    import optuna

    searched = searched_keys(finished)
    mask = active_mask(finished, searched)
    notes, dists = [], {}
    for j, key in enumerate(searched):
        column = f"config/{key}"
        if column not in finished:
            notes.append(f"{key}: not in the table")
        elif (dist := infer_distribution(finished[column][mask[:, j]])) is None:
            notes.append(f"{key}: one value only")
        else:
            dists[key] = dist
    if not dists:
        return None, notes
    study = optuna.create_study(direction="maximize", study_name="leaderboard")
    column = {k: searched.index(k) for k in dists}
    for i, (_, row) in enumerate(finished.iterrows()):
        applies = [k for k in dists if mask[i, column[k]]]
        params = {k: _cast(_plain(row[f"config/{k}"]), dists[k]) for k in applies}
        distributions = {k: dists[k] for k in applies}
        trial = optuna.trial.create_trial(
            params=params, distributions=distributions, value=float(row[OBJECTIVE])
        )
        study.add_trial(trial)
    return study, notes


def _cast(value: object, dist) -> object:
    from optuna.distributions import FloatDistribution, IntDistribution

    if isinstance(dist, IntDistribution):
        return int(value)
    return float(value) if isinstance(dist, FloatDistribution) else value


def hyperparameter_importances(finished: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """fANOVA importances (Optuna, seeded) for the objective of the searched keys that apply to every finished
    trial, or (None, why not). fANOVA needs every trial to have every parameter, so Optuna leaves a conditional
    key (e.g. adapter.molre.experts, MoLRE trials only) out; ``conditional_importances`` covers it."""
    import optuna

    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, f"skipped: {len(finished)} finished trial(s) < {MIN_TRIALS_FOR_IMPORTANCE}"
    if not searched_keys(finished):
        return None, "skipped: the table names no searched keys"
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, notes = importance_study(finished)
        if study is None:
            return None, "skipped: no searched key took more than one value (" + "; ".join(notes) + ")"
        notes += _conditional_notes(study)
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except Exception as err:  # a degenerate study (e.g. a constant objective) must not sink the report
        return None, f"skipped: Optuna could not evaluate importances ({type(err).__name__}: {err})"
    finally:
        optuna.logging.set_verbosity(verbosity)
    series = pd.Series(values, dtype=float).sort_values(ascending=False)
    extra = f" Not included: {'; '.join(notes)}." if notes else ""
    if series.empty:
        return None, f"skipped: no searched key that varies applies to every trial.{extra}"
    if not np.isfinite(series.to_numpy()).all():
        return None, "skipped: importances undefined (the objective does not vary)"
    return series, f"fANOVA over {len(finished)} finished trials.{extra}"


def _conditional_notes(study) -> list[str]:
    """One note per parameter that some of the study's trials lack (fANOVA leaves it out)."""
    trials = study.get_trials(deepcopy=False)
    counts = pd.Series([k for t in trials for k in t.params], dtype=object).value_counts()
    return [f"{k}: conditional, applies to {n} of {len(trials)} trials (importance within those below)"
            for k, n in counts.items() if n < len(trials)]  # fmt: skip


@dataclass(frozen=True)
class ConditionalImportance:
    keys: tuple[str, ...]  # conditional keys that apply to the same trials
    trials: int  # how many
    importances: pd.Series | None
    message: str


def conditional_importances(finished: pd.DataFrame) -> list[ConditionalImportance]:
    """fANOVA within the trials a conditional key applies to (its condition held, e.g. the MoLRE trials for
    adapter.molre.experts), one study per set of keys that apply to the same trials; keys that vary there only."""
    searched = searched_keys(finished)
    mask = active_mask(finished, searched)
    groups: dict[bytes, list[str]] = {}
    for j, key in enumerate(searched):
        applies = mask[:, j]
        conditional = applies.any() and not applies.all() and f"config/{key}" in finished
        if conditional and infer_distribution(finished[f"config/{key}"][applies]) is not None:
            groups.setdefault(applies.tobytes(), []).append(key)
    out = []
    for raw, keys in groups.items():
        subset = finished[np.frombuffer(raw, dtype=bool)]
        series, message = hyperparameter_importances(subset)
        out.append(ConditionalImportance(tuple(keys), len(subset), series, message))
    return out


# ---- 7. router analysis ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouterResult:
    preset: str
    trial_id: str
    experts: int  # K
    entropy: float  # mean routing entropy, nats
    usage: pd.DataFrame  # rows: category display names; columns: expert index 0..K-1

    @property
    def relative_entropy(self) -> float:
        """Entropy / ln K: 1 = uniform routing over all experts, 0 = one expert takes everything."""
        return self.entropy / math.log(self.experts) if self.experts > 1 else math.nan


def router_usage(trial: pd.Series) -> pd.DataFrame:
    """``router/usage/<category>/<k>`` of one trial as a (category x expert) frame; empty when absent."""
    cells = {}
    for name, value in trial.items():
        match = _ROUTER_USAGE.match(str(name))
        if match and match["category"] in CATEGORY_NAMES and pd.notna(value):
            cells[(CATEGORY_NAMES[match["category"]], int(match["k"]))] = float(value)
    if not cells:
        return pd.DataFrame()
    experts = range(max(k for _, k in cells) + 1)
    rows = [n for n in CATEGORY_NAMES.values() if any((n, k) in cells for k in experts)]
    return pd.DataFrame(
        [[cells.get((r, k), np.nan) for k in experts] for r in rows], index=rows, columns=experts
    )


def router_results(best: dict[tuple[str, str], Setting]) -> list[RouterResult]:
    """Per backbone, the best trial of the best MoLRE setting. Never averaged over seeds: expert k of one
    seed has nothing to do with expert k of another (experts are interchangeable up to permutation)."""
    out = []
    for preset in preset_order(p for p, _ in best):
        setting = best.get((preset, MOLRE))
        if setting is None:
            continue
        trial = setting.best_trial()
        usage = router_usage(trial)
        if usage.empty:
            continue
        entropy = _plain(trial.get("router/entropy"))
        out.append(RouterResult(preset, str(trial.get("trial_id")), usage.shape[1],
                                float(entropy) if entropy is not None else math.nan, usage))  # fmt: skip
    return out


def router_table(results: list[RouterResult]) -> pd.DataFrame:
    return pd.DataFrame([{
        "Model": r.preset, "trial": r.trial_id, "experts K": r.experts, "routing entropy (nats)": _fmt(r.entropy),
        "ln K": _fmt(math.log(r.experts)), "entropy / ln K": _fmt(r.relative_entropy, 2),
        "most used expert per category": "; ".join(f"{c}: E{int(row.idxmax())}" for c, row in r.usage.iterrows()),
    } for r in results])  # fmt: skip


# ---- the report --------------------------------------------------------------------------------------------


@dataclass
class Analysis:
    """Everything the sections need, computed once from the trials table."""

    trials: pd.DataFrame
    finished: pd.DataFrame
    pool_note: str
    best: dict[tuple[str, str], Setting]

    @classmethod
    def of(cls, trials: pd.DataFrame) -> Analysis:
        finished = finished_trials(trials)
        pool, note = comparison_pool(finished)
        return cls(trials, finished, note, best_settings(pool))


def _file_name(stem: str, preset: str) -> str:
    return f"{stem}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', preset)}.png"


def _overview(a: Analysis) -> list[Block]:
    status = _column(a.trials, "status").astype(object).fillna("UNKNOWN").value_counts()
    counts = ", ".join(f"{n} {s}" for s, n in status.items()) or "none"
    lines = [
        f"Trials in the table: {len(a.trials)} ({counts}); ranked (finished, with an objective): {len(a.finished)}.",
        f"Objective: {OBJECTIVE} (validation mean AUC over defined findings, at each trial's best epoch).",
        "Table 2 uses, per backbone and side, the best setting by its mean objective over seeds; per-finding "
        "AUCs are averaged over that setting's seeds first. These are validation numbers, and the best of "
        "several settings is selected on the same validation set: a side with more settings tried is flattered.",
    ]
    lines += [a.pool_note] if a.pool_note else []
    errors = (_column(a.trials, "status").astype(object) == "ERROR").sum()
    if errors:
        lines.append(f"{int(errors)} trial(s) ended in ERROR and appear only in trials.csv / trials.parquet.")
    return [Heading("Overview"), Bullets(tuple(lines))]


def _ranking(a: Analysis) -> list[Block]:
    if a.finished.empty:
        return [Heading("Ranking"), Text("No finished trials yet: nothing to rank.")]
    shown = min(TOP_ROWS, len(a.finished))
    caption = f"Top {shown} of {len(a.finished)} finished trials by {OBJECTIVE} (all trials: trials.csv)."
    return [Heading("Ranking"), Table(ranking_table(a.finished, TOP_ROWS), caption)]


def _table2(a: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Table 2: backbones, LoRA vs +MoLRE")]
    if not a.best:
        return [*blocks, Text("No finished trial with a backbone preset and an adapter kind yet.")]
    caption = (
        "Mean AUC ± std across findings (seed-averaged per finding); seeds: how many, and the sd of the "
    )
    caption += "objective across them. '-' = no finished trial on that side."
    return [*blocks, Table(table2(a.best), caption),
            Table(settings_table(a.best), "Settings behind each cell (searched keys; seed left out).")]  # fmt: skip


def _statistics(a: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("MoLRE vs LoRA: paired statistics across findings")]
    comps = comparisons(a.best)
    if not comps:
        return [
            *blocks,
            Text("No backbone has finished trials on both sides (LoRA and +MoLRE): no comparison."),
        ]
    method = (
        f"Per backbone: difference of seed-averaged per-finding AUC (MoLRE - LoRA), paired by finding over the "
        f"findings defined on both sides. 95% CI: percentile bootstrap over findings ({N_BOOTSTRAP} resamples, "
        f"seed 0). p: two-sided Wilcoxon signed-rank test across findings. Fewer than {MIN_PAIRED} pairs: not "
        "enough data, no CI or test. Findings share one model and one validation set, so they are not "
        "independent samples, and no correction is made for testing several backbones: read p as a guide."
    )
    return [*blocks, Text(method), Table(comparison_table(comps))]


def _stratified(a: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Stratified counts (paper Fig. 2)")]
    if not a.best:
        return [*blocks, Text("No finished trials: no counts.")]
    counts = stratified_counts(a.best)
    caption = "Findings with seed-averaged AUC >= 0.90 and 0.80 <= AUC < 0.90, per backbone and side."
    image = Image("stratified_counts.png", plots.stratified_bars(counts[list(BANDS)]), caption)
    return [*blocks, Table(_counts_display(counts), caption), image]


def _radars(a: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Per-finding AUC (paper Fig. 3)")]
    for preset in preset_order(p for p, _ in a.best):
        if (preset, LORA) not in a.best or (preset, MOLRE) not in a.best:
            continue
        pairs = pd.concat([a.best[(preset, k)].per_finding for k in (LORA, MOLRE)], axis=1).dropna()
        if len(pairs) < 3:
            blocks.append(
                Text(f"{preset}: {len(pairs)} finding(s) defined on both sides, too few for a radar.")
            )
            continue
        found = [f for f in FINDINGS if f.id in pairs.index]  # taxonomy order keeps categories contiguous
        png = plots.radar(f"{preset}: LoRA vs +MoLRE ({len(found)} findings)", [f.name for f in found],
                          [f.category for f in found], pairs.iloc[:, 0].to_numpy(), pairs.iloc[:, 1].to_numpy(),
                          CATEGORY_NAMES)  # fmt: skip
        caption = f"{preset}: per-finding AUC, LoRA vs +MoLRE (seed-averaged), spokes grouped by category"
        blocks.append(Image(_file_name("radar", preset), png, caption))
    if len(blocks) == 1:
        blocks.append(Text("No backbone has both sides finished: no radar plots."))
    return blocks


def _importances(a: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Hyperparameter importances")]
    series, message = hyperparameter_importances(a.finished)
    if series is None:
        blocks.append(Text(f"Importances {message.rstrip('.')}."))
    else:
        image = Image(
            "importances.png", plots.importance_bars(series), "Optuna fANOVA importances for the objective"
        )
        blocks += [Text(message), Table(_importance_frame(series)), image]
    if len(a.finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return blocks
    for c in conditional_importances(a.finished):
        text = f"Within the {c.trials} trials where {', '.join(c.keys)} apply: "
        if c.importances is None:
            blocks.append(Text(text + f"importances {c.message.rstrip('.')}."))
        else:
            blocks += [Text(text + c.message), Table(_importance_frame(c.importances))]
    return blocks


def _importance_frame(series: pd.Series) -> pd.DataFrame:
    return pd.DataFrame({"hyperparameter": series.index, "importance": [f"{v:.3f}" for v in series]})


def _router(a: Analysis) -> list[Block]:
    blocks: list[Block] = [Heading("Router analysis")]
    results = router_results(a.best)
    if not results:
        return [*blocks, Text("No finished MoLRE trial with router statistics: nothing to show.")]
    text = (
        "Best trial of each backbone's best MoLRE setting (experts are not comparable across seeds, so nothing is "
        "averaged over seeds). Usage: mean routing weight of expert k over validation volumes positive for a "
        "finding of the category; uniform routing reads 1/K. Entropy / ln K: 1 = uniform, 0 = one expert."
    )
    panels = [
        plots.RouterPanel(f"{r.preset} (K={r.experts}, H/ln K={_fmt(r.relative_entropy, 2)})", r.usage)
        for r in results
    ]
    image = Image("router_usage.png", plots.router_heatmaps(panels), "Expert usage per finding category")
    return [*blocks, Text(text), Table(router_table(results)), image]


SECTIONS = (_overview, _ranking, _table2, _statistics, _stratified, _radars, _importances, _router)


def build_blocks(trials: pd.DataFrame) -> list[Block]:
    analysis = Analysis.of(trials)
    return [block for section in SECTIONS for block in section(analysis)]


def write_leaderboard(trials: pd.DataFrame, out_uri: str, *, title: str = "molre sweep",
                      write_trials: bool = True) -> dict[str, str]:  # fmt: skip
    """Write trials.parquet/.csv, leaderboard.md, report.html and the PNGs under ``out_uri``; returns
    ``{file name: URI}``. ``write_trials=False`` leaves an existing trials.parquet alone (when ``out_uri`` is
    the experiment itself, the sweep driver owns that file)."""
    blocks = build_blocks(trials)
    files: dict[str, bytes] = {}
    if write_trials:
        buf = io.BytesIO()
        trials.to_parquet(buf, index=False)
        files[TRIALS_FILE] = buf.getvalue()
    files["trials.csv"] = trials.to_csv(index=False).encode()
    files["leaderboard.md"] = render_markdown(title, blocks).encode()
    files["report.html"] = render_html(title, blocks).encode()
    files.update({b.name: b.png for b in blocks if isinstance(b, Image)})
    written = {}
    for name, data in files.items():
        written[name] = storage.join(out_uri, name)
        storage.write_bytes(written[name], data)
    if not write_trials:
        written = {TRIALS_FILE: storage.join(out_uri, TRIALS_FILE), **written}
    return written


# ---- CLI ---------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "experiment", metavar="EXPERIMENT_URI", help="experiment folder holding trials.parquet"
    )
    parser.add_argument(
        "--out", default=None, help="where to write the leaderboard (default: EXPERIMENT_URI)"
    )
    parser.add_argument("--title", default=None, help="report title (default: 'molre sweep: <experiment>')")
    parser.add_argument("--top", type=int, default=10, help="ranking rows to print (default 10)")


def run(args) -> int:
    trials = load_trials(args.experiment)
    out = args.out or args.experiment
    same = storage.join(out) == storage.join(args.experiment)
    title = args.title or f"molre sweep: {storage.join(args.experiment).rsplit('/', 1)[-1]}"
    written = write_leaderboard(trials, out, title=title, write_trials=not same)
    finished = finished_trials(trials)
    print(f"{len(trials)} trials, {len(finished)} finished")
    if not finished.empty:
        print(ranking_table(finished, args.top).to_string(index=False))
    for name, uri in written.items():
        print(f"wrote {uri}" if name != TRIALS_FILE or not same else f"kept  {uri}")
    return 0
