"""The sweep driver: Ray Tune over a search-space file, one trial = one TorchTrainer (Ray Train V2 pattern).

    spec (search_spaces/*.yaml) -> searcher (Optuna TPE via OptunaSearch, repeated over seeds; or a grid)
      -> ASHA -> trial: run config -> TorchTrainer.fit() (epoch metrics forwarded by BestEpochReportCallback,
         each with the best epoch's per-finding AUCs, so that an ASHA-stopped trial's row is its best epoch's)
      -> final report (best-epoch per-finding AUCs, router analysis, parameter counts)
      -> trials.parquet + leaderboard (Markdown, HTML) in <storage>/<name>/, rewritten as trials finish (at most
         once per $MOLRE_LEADERBOARD_INTERVAL_S, 30 s) and at the end

Experiment names are the spec's ``name`` (no timestamps), so ``resume=True`` restores the experiment: finished
trials are not re-run, the searcher keeps its state, and an interrupted trial resumes from its last checkpoint.
A new experiment records its spec and data (``molre_spec.json``); ``resume=True`` refuses a spec or data that
differ from the record (a changed file, or another experiment of the same name), naming the changed keys, except
the per-worker resources (another cluster shape: ``RELOCATABLE_KEYS``), which the remaining trials take.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import ray.tune
from pydantic import ValidationError
from ray.tune.integration.ray_train import TuneReportCallback

from molre.config import config_to_dict, flat_dotted
from molre.data import storage
from molre.errors import ConfigError
from molre.findings import CATEGORY_SIZES, FINDING_IDS, FINDINGS
from molre.train.metrics import per_finding_auc, summarize
from molre.tune.space import OptunaSpace, SweepSpec, active_keys, grid_points, run_config_for

TRIALS_FILE = "trials.parquet"
SPEC_FILE = "molre_spec.json"  # in the experiment's folder: the spec and data it was created with
SPEC_RECORD_VERSION = 1
# the least time between two leaderboard rewrites while trials finish (the sweep's end always writes)
LEADERBOARD_INTERVAL_ENV = "MOLRE_LEADERBOARD_INTERVAL_S"
LEADERBOARD_INTERVAL_S = 30.0
# every trial report says which it is: "epoch" (ASHA may stop the trial after any) or "final" (``run_trial``)
REPORT = "report"
# what each trial's Train workers were given, on every report: the trials table shows what a trial ran with,
# which after a resume on another cluster shape (``check_resumable``) is not what the spec says now
SCALING_METRICS = ("cpus_per_worker", "gpus_per_worker")

log = logging.getLogger(__name__)


# ---- one trial --------------------------------------------------------------------------------------------


def _point_and_seed(config: dict, spec: SweepSpec) -> tuple[dict, int]:
    if "point" in config:  # grid: {"point": {...}, "seed": s}
        return dict(config["point"]), int(config["seed"])
    index = int(config.get("__trial_index__", 0))  # Optuna + Repeater: one suggestion, repeated per seed
    point = {k: v for k, v in config.items() if k in spec.space}
    return point, spec.search.seeds[index % len(spec.search.seeds)]


def trial_config(config: dict, spec: SweepSpec, data_uri: str | None = None):
    """``(run config, point)`` of a trial from the config Tune recorded for it (its point and seed): the spec's
    base with the point, the seed, the sweep's data (when given) and the per-trial resources."""
    point, seed = _point_and_seed(config, spec)
    cfg = run_config_for(spec, point, seed)
    if data_uri:
        cfg.data.uri = data_uri
    res = spec.resources
    cfg.scaling.num_workers, cfg.scaling.cpus_per_worker = res.num_workers, res.cpus_per_worker
    cfg.scaling.gpus_per_worker = res.gpus_per_worker
    return cfg, point


def trial_run_config(config: dict, spec: SweepSpec, data_uri: str, experiment_uri: str, trial_id: str):
    cfg, point = trial_config(config, spec, data_uri)
    cfg.train.storage = storage.join(experiment_uri, "runs")
    cfg.train.run_name = trial_id  # stable across --resume: Train restores the trial's own checkpoints
    return cfg, point


class BestEpochAUCs:
    """The per-finding val AUCs of a trial's best epoch so far, to carry on every epoch report as ``auc/<id>``.

    An ASHA-stopped trial has no final report: its objective is ``val/best_mean_auc`` (the best epoch), so its
    per-finding AUCs, and the std and band counts ``trial_row`` derives from them, must be that epoch's too.
    """

    def __init__(self):
        self.epoch, self.aucs = -1, {}

    def update(self, metrics: dict) -> dict:
        """Keep this epoch's AUCs if it is the best (``epoch == best_epoch``); ``{auc/<id>: best epoch's}``,
        or ``{}`` while the best epoch's AUCs are unknown (e.g. it came before a resume)."""
        epoch, best = metrics.get("epoch"), metrics.get("best_epoch")
        if epoch is not None and epoch == best and f"val/auc/{FINDING_IDS[0]}" in metrics:
            self.remember(best, {fid: metrics[f"val/auc/{fid}"] for fid in FINDING_IDS})
        return dict(self.aucs) if best is not None and best == self.epoch else {}

    def remember(self, epoch: int, aucs: dict) -> None:
        self.epoch = epoch
        self.aucs = {f"auc/{fid}": float(aucs.get(fid, math.nan)) for fid in FINDING_IDS}


class BestEpochReportCallback(TuneReportCallback):
    """Ray Train -> Tune forwarding (``TuneReportCallback``) that adds the best epoch's per-finding AUCs to each
    report; after a resume it reads them once from the checkpoint's best-epoch validation outputs. ``extra``:
    added to every report as is (the trial's ``scaling_metrics``)."""

    def __init__(self, extra: dict | None = None):
        super().__init__()
        self.best = BestEpochAUCs()
        self.extra = dict(extra or {})

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0]
        extra = self.best.update(first)
        if not extra and checkpoint is not None and first.get("best_epoch", -1) >= 0:
            aucs = best_aucs_in_checkpoint(checkpoint)
            if aucs is not None:
                self.best.remember(first["best_epoch"], aucs)
                extra = self.best.update(first)
        extra = {**extra, **self.extra}
        super().after_report(run_context, [{**first, **extra}, *metrics[1:]], checkpoint)


def best_aucs_in_checkpoint(checkpoint) -> dict | None:
    """``{finding: AUC}`` from a checkpoint's ``val_outputs.npz`` (the best epoch's); None when it has none."""
    path = f"{checkpoint.path}/val_outputs.npz"
    try:
        with checkpoint.filesystem.open_input_file(path) as f:
            outputs = dict(np.load(io.BytesIO(f.read())))
    except OSError:  # FileNotFoundError included
        return None
    aucs = per_finding_auc(outputs["scores"], outputs["labels"], outputs["known"])
    return dict(zip(FINDING_IDS, map(float, aucs), strict=True))


def run_trial(config: dict, spec: dict, data_uri: str, experiment_uri: str) -> None:
    """Tune trial: build and fit a TorchTrainer, then report the best epoch's full metrics.

    ``spec`` is the sweep's current spec (``with_parameters``, also on ``--resume``): the Train workers' resources
    come from it, so a resume on another cluster shape runs the remaining trials with the new ones."""
    from molre.train.checkpoint import checkpoint_uri  # torch: not for the driver's import of this module
    from molre.train.run import build_trainer, fit, prepare

    sweep = SweepSpec.model_validate(spec)
    trial_id = ray.tune.get_context().get_trial_id()
    cfg, point = trial_run_config(config, sweep, data_uri, experiment_uri, trial_id)
    setup = prepare(cfg, verify=False)  # the driver verified the shards' checksums once for the sweep
    result = fit(build_trainer(cfg, setup, callbacks=[BestEpochReportCallback(epoch_report_extra(cfg))]))
    with result.checkpoint.as_directory() as directory:
        final = final_metrics(directory, cfg)
    # s3://... on S3 (Ray's path lacks the scheme): `molre evaluate` and storage read it as is
    where = checkpoint_uri(result.checkpoint.path, cfg.train.storage)
    ray.tune.report(
        {**final, "point": json.dumps(point, default=str), "checkpoint_path": where, REPORT: "final"}
    )


def epoch_report_extra(cfg) -> dict:
    """What each epoch report of a trial carries besides the epoch's metrics: the trial's resources, its
    parameter counts (``params/*``: an objective of a multi-objective search, which Optuna must find in the
    last report of a trial that ASHA stops) and that it is an epoch's (``REPORT``)."""
    return {**scaling_metrics(cfg), **param_metrics(cfg), REPORT: "epoch"}


def param_metrics(cfg) -> dict:
    """``{params/<name>: count}`` of the run's model (built on the meta device: no weights, no memory)."""
    from molre.models.params import count_config_params

    return {f"params/{k}": v for k, v in count_config_params(cfg).items()}


def is_final(metrics: dict) -> bool:
    """Whether a trial's (last) report is its final one: ``REPORT``, or for a trial reported before it was
    recorded, the parameter counts that only the final report then carried."""
    kind = metrics.get(REPORT)
    return kind == "final" if kind is not None else "params/total" in metrics


def scaling_metrics(cfg) -> dict:
    """``{scaling/<key>: value}``: the per-worker resources this trial's TorchTrainer asked for."""
    return {f"scaling/{key}": float(getattr(cfg.scaling, key)) for key in SCALING_METRICS}


def checkpoint_scaling(checkpoint_dir: str, cfg) -> dict:
    """``scaling_metrics`` of the run that wrote the checkpoint (its config.yaml), else of ``cfg``: a trial
    resumed after its Train run had finished re-reports that run without training, under the current spec."""
    from molre.train.checkpoint import read_config

    has_config = (Path(checkpoint_dir) / "config.yaml").exists()
    return scaling_metrics(read_config(checkpoint_dir) if has_config else cfg)


def final_metrics(checkpoint_dir: str, cfg) -> dict:
    """Best-epoch metrics from a checkpoint: summary, per-finding AUCs, routing analysis, parameter counts, and
    the per-worker resources its run had (``checkpoint_scaling``)."""
    from molre.train.checkpoint import read_state

    state = read_state(checkpoint_dir)
    outputs_path = Path(checkpoint_dir) / "val_outputs.npz"
    out = {"epochs": state.epoch + 1, "best_epoch": state.best_epoch, "val/best_mean_auc": state.best_metric}
    if outputs_path.exists():
        outputs = dict(np.load(outputs_path))
        aucs = per_finding_auc(outputs["scores"], outputs["labels"], outputs["known"])
        summary = summarize(aucs).as_dict("val/")
        out.update({k: v for k, v in summary.items() if k != "val/mean_auc"})
        out.update({f"auc/{fid}": float(a) for fid, a in zip(FINDING_IDS, aucs, strict=True)})
        out.update(router_analysis(outputs))
    out.update(param_metrics(cfg))
    out.update(checkpoint_scaling(checkpoint_dir, cfg))
    return out


def router_analysis(outputs: dict[str, np.ndarray]) -> dict:
    """Mean routing weight of each expert over validation volumes positive for each category; entropy."""
    router = outputs.get("router")
    if router is None or router.ndim != 2 or not len(router):
        return {}
    entropy = -(router * np.log(np.clip(router, 1e-12, 1))).sum(axis=1).mean()
    out = {"router/entropy": float(entropy)}
    positive = (outputs["labels"] > 0) & (outputs["known"] > 0)
    for category in CATEGORY_SIZES:
        columns = [f.index for f in FINDINGS if f.category == category]
        rows = positive[:, columns].any(axis=1)
        usage = router[rows].mean(axis=0) if rows.any() else np.full(router.shape[1], np.nan)
        out.update({f"router/usage/{category}/{k}": float(u) for k, u in enumerate(usage)})
    return out


# ---- the trials table -------------------------------------------------------------------------------------


def trial_row(
    trial_id: str, status: str, config: dict, metrics: dict, spec: SweepSpec, data_uri: str | None = None
) -> dict:
    """One trial's row: its run config (``trial_config``: the point and seed Tune recorded for it, on the spec
    the experiment was created with, which ``--resume`` checks is the current one), its metrics and state.
    ``data_uri``: the data the sweep resolved (else the spec's ``data.uri``)."""
    cfg, point = trial_config(config or {"point": {}, "seed": 0}, spec, data_uri)
    row = {"trial_id": trial_id, "status": status, "searched": json.dumps([*spec.space, "train.seed"])}
    # lists (windows, augmentation ranges) as JSON text: one value per table cell
    values = {
        k: json.dumps(v) if isinstance(v, list | tuple) else v
        for k, v in flat_dotted(config_to_dict(cfg)).items()
    }
    searched_here = active_keys(spec, {**values, **point})  # the keys whose `when` condition held
    row["active_keys"] = json.dumps([*searched_here, "train.seed"])
    row.update({f"config/{k}": v for k, v in values.items()})
    metrics = metrics or {}
    for key in SCALING_METRICS:  # what the trial ran with (its reports), else the spec's
        if f"scaling/{key}" in metrics:
            row[f"config/scaling.{key}"] = metrics[f"scaling/{key}"]
    final = is_final(metrics)  # the trial's last report is the final one
    row["stopped_early"] = status == "TERMINATED" and not final
    row["epochs"] = metrics.get("epochs", (metrics.get("epoch", -1) + 1) if "epoch" in metrics else 0)
    row["checkpoint"] = metrics.get("checkpoint_path")
    row["seconds"] = metrics.get("time_total_s", math.nan)  # the trial's run time, actor start not included
    row["node_ip"] = metrics.get("node_ip")  # where it ran: node and process (Tune reuses a trial's actor)
    row["pid"] = metrics.get("pid")
    for key, value in metrics.items():
        if key.startswith(("val/", "auc/", "params/", "router/")) and isinstance(value, int | float):
            row[key] = value
    if not final:  # ASHA-stopped or running: per-finding AUCs and their summary from the best epoch
        row.update(unfinished_trial_aucs(metrics))
    return {k: v for k, v in row.items() if not k.startswith("val/auc/")}


def unfinished_trial_aucs(metrics: dict) -> dict:
    """Per-finding AUCs of a trial without a final report, and the std / band counts they give: the best
    epoch's (``auc/<id>``, carried by each epoch report), else (older results) the last epoch's ``val/auc/<id>``.
    ``val/mean_auc`` stays the last epoch's; the best epoch's mean is the objective, val/best_mean_auc."""
    prefix = "auc/" if f"auc/{FINDING_IDS[0]}" in metrics else "val/auc/"
    aucs = np.array([metrics.get(f"{prefix}{fid}", math.nan) for fid in FINDING_IDS], dtype=float)
    out = {f"auc/{fid}": float(a) for fid, a in zip(FINDING_IDS, aucs, strict=True)}
    if f"{prefix}{FINDING_IDS[0]}" in metrics:  # no epoch reported yet: no summary either
        out.update({k: v for k, v in summarize(aucs).as_dict("val/").items() if k != "val/mean_auc"})
    return out


def trials_table(trials, spec: SweepSpec, data_uri: str | None = None, ended=None) -> pd.DataFrame:
    """The table of Tune's trials. ``ended``: the trial Tune is finishing (``on_trial_complete``), which it
    marks TERMINATED only after its callbacks ran: it is written as TERMINATED, not as still RUNNING."""
    rows = []
    for t in trials:
        status = "TERMINATED" if t is ended and t.status not in ("ERROR", "TERMINATED") else t.status
        rows.append(trial_row(t.trial_id, status, t.config, t.last_result, spec, data_uri))
    return pd.DataFrame(rows)


def leaderboard_interval_s() -> float:
    """``$MOLRE_LEADERBOARD_INTERVAL_S`` (seconds >= 0; 0 rewrites at every trial's end), else 30 s."""
    text = os.environ.get(LEADERBOARD_INTERVAL_ENV, "").strip()
    if not text:
        return LEADERBOARD_INTERVAL_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{LEADERBOARD_INTERVAL_ENV}={text!r}: expected seconds >= 0 between leaderboard "
                          "rewrites (0: at every trial's end)")  # fmt: skip
    return value


class LeaderboardCallback(ray.tune.Callback):
    """Rewrites trials.parquet and the leaderboard as trials finish or fail, at most once per
    ``leaderboard_interval_s()``: a rewrite renders every plot (seconds, more on S3) inside Tune's control loop,
    which meanwhile starts no trial and takes no result, so a burst of endings (an ASHA rung stopping many
    trials) costs one rewrite, not one per trial. A finished trial that waits for the interval is written from
    ``on_step_begin`` (every pass of the loop) once it is over; the first ending always writes at once; the
    sweep's end always writes (``run_sweep``).

    A failed rewrite (storage outage, a plotting error) is logged and the sweep goes on: the next trial's end
    rewrites everything (a pending one is retried from ``on_step_begin`` once per interval, not at every step),
    and the sweep's final write (``run_sweep``) raises if it fails too."""

    def __init__(self, spec: SweepSpec, experiment_uri: str, data_uri: str | None = None):
        self.spec, self.experiment_uri, self.data_uri = spec, experiment_uri, data_uri
        self._written_at = self._tried_at = None  # time.monotonic() of the last rewrite / attempt
        self._pending = False  # a trial ended since the last rewrite

    def __getstate__(self):
        # pickled with the experiment (tuner.pkl): a monotonic time means nothing in the process that restores it
        return {**self.__dict__, "_written_at": None, "_tried_at": None, "_pending": False}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.request(trials, ended=trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.request(trials)  # Tune marked it ERROR before calling this

    def on_step_begin(self, iteration, trials, **info):
        if getattr(self, "_pending", False) and self._since("_tried_at") >= leaderboard_interval_s():
            self.rewrite(trials)

    def request(self, trials, ended=None) -> None:
        """A trial ended: rewrite now when the last rewrite is old enough, else later (``on_step_begin``, when
        Tune has marked it TERMINATED)."""
        self._pending = True
        if self._since("_written_at") >= leaderboard_interval_s():
            self.rewrite(trials, ended)

    def _since(self, name: str) -> float:
        """Seconds since ``name``'s time; inf when none (not yet in this process, or an older pickle)."""
        at = getattr(self, name, None)
        return math.inf if at is None else time.monotonic() - at

    def rewrite(self, trials, ended=None) -> None:
        # getattr: a callback pickled by an older version (restored with its experiment) has no data_uri
        try:
            table = trials_table(trials, self.spec, getattr(self, "data_uri", None), ended)
            write_results(table, self.experiment_uri, self.spec)
        except Exception as err:  # the leaderboard must not abort the trials still to run
            log.error(
                "molre sweep %s: could not rewrite the leaderboard in %s (the sweep goes on; it is rewritten "
                "when the next trial ends and at the end of the sweep): %s: %s",
                self.spec.name, self.experiment_uri, type(err).__name__, err,
            )  # fmt: skip
            self._tried_at = time.monotonic()  # still pending: the next due trial end or step retries it
            return
        # the interval counts from the end of a rewrite: a slow one (S3, many plots) cannot fill the loop
        self._written_at = self._tried_at = time.monotonic()
        self._pending = False


def write_results(table: pd.DataFrame, experiment_uri: str, spec: SweepSpec) -> dict:
    from molre.tune.leaderboard import write_leaderboard

    return write_leaderboard(table, experiment_uri, title=f"molre sweep {spec.name}")


# ---- the driver -------------------------------------------------------------------------------------------


def _searcher(spec: SweepSpec):
    from ray.tune.search import Repeater
    from ray.tune.search.optuna import OptunaSearch

    objectives = spec.search.objectives
    if len(objectives) > 1:
        if len(spec.search.seeds) > 1:
            raise ConfigError(
                f"sweep {spec.name}: multi-objective search takes one seed (Repeater averages one metric)"
            )
        return OptunaSearch(OptunaSpace(spec), metric=[m for m, _ in objectives],
                            mode=[d for _, d in objectives], seed=0)  # fmt: skip
    searcher = OptunaSearch(OptunaSpace(spec), metric=spec.search.metric, mode=spec.search.mode, seed=0)
    return (
        Repeater(searcher, repeat=len(spec.search.seeds), set_index=True)
        if len(spec.search.seeds) > 1
        else searcher
    )


def _scheduler(spec: SweepSpec, max_epochs: int):
    if spec.scheduler.asha is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = spec.scheduler.asha
    # one objective: TuneConfig gives ASHA its metric and mode (Tune refuses a scheduler that has its own too);
    # several: TuneConfig has none, so ASHA is given the first objective's
    own = {"metric": spec.search.metric, "mode": spec.search.mode} if len(spec.search.objectives) > 1 else {}
    return ASHAScheduler(time_attr="training_iteration", max_t=max_epochs + 1, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, **own)  # fmt: skip


def max_concurrent(spec: SweepSpec) -> int:
    """Explicit, or what the cluster's GPUs (else CPUs) hold at the per-trial resources."""
    import ray

    res = spec.resources
    if res.max_concurrent_trials:
        return res.max_concurrent_trials
    total = ray.cluster_resources()
    if total.get("GPU", 0) > 0:
        return max(1, int(total["GPU"] // (res.num_workers * res.gpus_per_worker)))
    per_trial = res.num_workers * res.cpus_per_worker + 1  # + 1 CPU of headroom for the trial's data reads
    return max(1, int(total.get("CPU", 1) // per_trial))


def sweep_data_uri(spec: SweepSpec, storage_root: str, synthetic: dict | None = None) -> str:
    """The spec's data.uri, or the embedded synthetic dataset (next to the results when storage is s3://)."""
    from molre.data.default import DEFAULT, dataset_key, ensure_default_dataset

    uri = spec.base.get("data", {}).get("uri", "")
    if uri:
        return uri
    key = dataset_key({**DEFAULT, **(synthetic or {})})
    out = storage.join(storage_root, "datasets", f"synthetic-{key}") if storage.is_s3(storage_root) else None
    return ensure_default_dataset(out, **(synthetic or {}))


def run_sweep(spec: SweepSpec, storage_root: str, resume: bool = False, synthetic: dict | None = None):
    """Run (or resume) the sweep; returns the trials table (also written with the leaderboard) and its paths.

    With ``multi_fidelity`` in the spec the points are screened on cached features first and only the best are
    trained end to end (``molre.tune.multifidelity``); the returned table is then the end-to-end one.
    """
    from molre.train.run import ensure_ray

    leaderboard_interval_s()  # a malformed setting fails here, not in Tune's loop as the first trial ends
    storage.check_bucket(storage_root)  # before Ray's storage check, which would create a mistyped bucket
    ensure_ray()
    if not storage.is_s3(storage_root):
        storage_root = os.path.abspath(storage_root)
    experiment_uri = storage.join(storage_root, spec.name)
    print(f"molre sweep {spec.name}: results in {experiment_uri}", flush=True)
    data_uri = checked_data_uri(spec, storage_root, synthetic)
    if spec.multi_fidelity is not None:
        from molre.tune.multifidelity import run_multi_fidelity

        return run_multi_fidelity(spec, storage_root, data_uri, resume)
    trainable = end_to_end_trainable(spec, data_uri, experiment_uri)
    results = fit_experiment(spec, trainable, storage_root, resume, data_uri=data_uri)
    table = table_from_results(results, spec, data_uri)
    return table, write_results(table, experiment_uri, spec)  # raises if it fails: the sweep's last word


def checked_data_uri(spec: SweepSpec, storage_root: str, synthetic: dict | None = None) -> str:
    """The sweep's data, with every shard's checksum verified once per sweep (trials then skip it)."""
    from molre.data.dataset import split_files

    data_uri = sweep_data_uri(spec, storage_root, synthetic)
    for split in ("train", "val"):
        split_files(data_uri, split, verify=True)
    return data_uri


def end_to_end_trainable(spec: SweepSpec, data_uri: str, experiment_uri: str):
    """``run_trial`` bound to the sweep; the trial driver sits on the head, its Train workers hold the devices."""
    return ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, spec=spec.model_dump(mode="json"), data_uri=data_uri,
                                 experiment_uri=experiment_uri),
        {"CPU": 0, "node:__internal_head__": 0.01},  # trial drivers live on the head (CPU:0 on clusters); workers hold the real resources
    )  # fmt: skip


def fit_experiment(
    spec: SweepSpec,
    trainable,
    storage_root: str,
    resume: bool,
    points: list[dict] | None = None,
    data_uri: str | None = None,
):
    """Fit (or restore and finish) the Tune experiment ``spec.name`` under ``storage_root``; the ResultGrid.

    ``points``: run exactly these points (each over all seeds, no early stopping) instead of the spec's search.
    ``data_uri``: the data the trials read; recorded with the spec in a new experiment's ``molre_spec.json``
    and, on resume, checked against the record (``check_resumable``).
    """
    from molre.data.dataset import arrow_filesystem

    fs, path = arrow_filesystem(storage_root)
    experiment_path = f"{path}/{spec.name}"
    experiment_uri = storage.join(storage_root, spec.name)
    if ray.tune.Tuner.can_restore(experiment_path, storage_filesystem=fs):
        if not resume:
            raise ConfigError(f"experiment {spec.name} already exists at {experiment_uri}; "
                              "pass --resume to finish it, or change the name")  # fmt: skip
        check_resumable(spec, experiment_uri, data_uri)
        tuner = ray.tune.Tuner.restore(experiment_path, trainable, resume_errored=True, storage_filesystem=fs)
    else:  # the record first: no restorable experiment (tuner.pkl, written by Tuner()) is ever without one
        write_experiment_record(experiment_uri, experiment_record(spec, data_uri))
        tuner = _new_tuner(spec, trainable, experiment_uri, fs, path, points, data_uri)
    return tuner.fit()


# ---- what an experiment was created with -----------------------------------------------------------------


def data_identity(data_uri: str | None) -> dict | None:
    """``{"uri", "manifest_sha256"}`` of the sweep's data: the manifest holds every shard's checksum, the grid
    and the preprocessing settings, so its hash names the data's content."""
    if not data_uri:
        return None
    from molre.data import shards

    return {"uri": data_uri, "manifest_sha256": shards.read_manifest_and_sha256(data_uri)[1]}


def experiment_record(spec: SweepSpec, data_uri: str | None) -> dict:
    return {
        "version": SPEC_RECORD_VERSION,
        "spec": spec.model_dump(mode="json"),
        "data": data_identity(data_uri),
    }


def write_experiment_record(experiment_uri: str, record: dict) -> None:
    text = json.dumps(record, indent=1, sort_keys=True, default=str) + "\n"
    storage.write_bytes(storage.join(experiment_uri, SPEC_FILE), text.encode())


def read_experiment_record(experiment_uri: str) -> dict | None:
    """The experiment's ``molre_spec.json``; None when it has none (created by an older molre)."""
    uri = storage.join(experiment_uri, SPEC_FILE)
    try:
        record = json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{uri}: not a readable experiment record ({type(err).__name__}: {err}); it says "
                          "what the experiment was created with: restore it, or start a new experiment") from None  # fmt: skip
    if not isinstance(record, dict) or not isinstance(record.get("spec"), dict):
        raise ConfigError(f"{uri}: not an experiment record (no 'spec' object)")
    return record


# Resources that decide where and how fast a trial's Train workers run, not what they compute: a resume may change
# them (another cluster shape). The remaining trials get the new ones (run_trial builds each trial's
# ScalingConfig from the current spec); the record keeps the old ones in its history. num_workers is not here:
# the DDP world size decides each worker's share of the batch and data, so it changes the results.
RELOCATABLE_KEYS = ("resources.cpus_per_worker", "resources.gpus_per_worker")
# Fixed by Tune when the experiment was created: its TuneConfig (max_concurrent_trials, reuse_actors) and
# RunConfig (FailureConfig.max_failures) are saved in tuner.pkl, and Tuner.restore takes no new ones (Ray 2.x:
# only the trainable and param_space are re-specified), so a resume would silently run with the recorded values.
TUNE_FIXED_KEYS = (
    "resources.max_concurrent_trials",
    "resources.reuse_actors",
    "resources.trial_max_failures",
)
RESUME_HISTORY = 20  # resumes with changed resources kept in the record: the first and the latest ones


def check_resumable(spec: SweepSpec, experiment_uri: str, data_uri: str | None) -> None:
    """Refuse (``ConfigError``, naming every changed key) to resume an experiment whose recorded spec or data
    differ from ``spec`` / ``data_uri``: its finished trials trained with the recorded ones, so finishing it
    with others would mix two experiments in one leaderboard. An experiment without a record (an older molre)
    is resumed with a warning, and gets the current spec and data as its record.

    ``RELOCATABLE_KEYS`` may differ (not for a multi-fidelity sweep, whose screen trials hold their resources in
    Tune's state): a warning names them, and the record takes the current spec, its ``resumes`` history the
    change (what the trials finished before it ran with)."""
    record = read_experiment_record(experiment_uri)
    current = experiment_record(spec, data_uri)
    if record is None:
        log.warning("molre sweep %s: %s has no %s (created by an older molre): resuming without checking that "
                    "the spec and data are the ones its finished trials ran with", spec.name, experiment_uri,
                    SPEC_FILE)  # fmt: skip
        write_experiment_record(experiment_uri, current)
        return
    try:  # the record as this version reads it: fields added since it was written take their defaults
        recorded_spec = SweepSpec.model_validate(record["spec"]).model_dump(mode="json")
    except ValidationError:
        recorded_spec = record["spec"]
    changed = _changed_values(recorded_spec, current["spec"])
    relocated = {k: v for k, v in changed.items() if k in RELOCATABLE_KEYS and spec.multi_fidelity is None}
    changes = [_show_change(k, *v) for k, v in changed.items() if k not in relocated]
    changes += _data_changes(spec, record.get("data"), current["data"])
    if changes:
        raise ConfigError(
            f"cannot resume experiment {spec.name} at {experiment_uri}: its {SPEC_FILE} records another spec or "
            f"data than this run's, so its finished trials trained with something else. Changed: "
            + "; ".join(changes)
            + ". Resume with the original spec and data, or give this one a new name."
            + _refusal_notes(spec, changed)
        )
    if relocated:
        log.warning("molre sweep %s: resuming with other per-worker resources (%s): the remaining trials run "
                    "with the new ones; %s keeps the old ones in its history", spec.name,
                    "; ".join(_show_change(k, *v) for k, v in relocated.items()), SPEC_FILE)  # fmt: skip
        write_experiment_record(experiment_uri, relocated_record(record, current, relocated))


def _data_changes(spec: SweepSpec, old_data: dict | None, new_data: dict | None) -> list[str]:
    """The changed data keys (another manifest); a moved copy of the same manifest is only logged."""
    if not (old_data and new_data):
        return []
    if old_data.get("manifest_sha256") != new_data["manifest_sha256"]:
        return _changed_keys(old_data, new_data, "data.")
    if old_data.get("uri") != new_data["uri"]:
        log.warning("molre sweep %s: the data moved (%s -> %s), same manifest: resuming on it", spec.name,
                    old_data.get("uri"), new_data["uri"])  # fmt: skip
    return []


def _refusal_notes(spec: SweepSpec, changed: dict) -> str:
    """Why a resources key that looks harmless is refused anyway."""
    notes = []
    fixed = [k for k in TUNE_FIXED_KEYS if k in changed]
    if fixed:
        notes.append(f" {', '.join(fixed)}: fixed by Tune when the experiment was created (its tuner.pkl holds "
                     "them, and Tuner.restore takes no new TuneConfig or RunConfig), so a resume cannot apply "
                     "a change.")  # fmt: skip
    if spec.multi_fidelity is not None and any(k in changed for k in RELOCATABLE_KEYS):
        notes.append(" A multi-fidelity sweep's screen trials hold their resources in Tune's state, so its "
                     "per-worker resources cannot change on resume either.")  # fmt: skip
    return "".join(notes)


def relocated_record(record: dict, current: dict, relocated: dict) -> dict:
    """The record after a resume with other ``RELOCATABLE_KEYS``: the current spec (the remaining trials run
    with it), the recorded data as they are (a resume without changes rewrites nothing either), and the change
    appended to ``resumes`` (the first entry and the latest ones kept: ``RESUME_HISTORY``)."""
    entry = {
        "resumed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "changed": {key: {"from": old, "to": new} for key, (old, new) in relocated.items()},
    }
    history = [*record.get("resumes", []), entry]
    if len(history) > RESUME_HISTORY:
        history = [history[0], *history[-(RESUME_HISTORY - 1) :]]
    return {**record, "version": current["version"], "spec": current["spec"], "resumes": history}


def _leaves(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


_ABSENT = object()  # a key one side of a comparison lacks


def _changed_values(old: dict, new: dict, prefix: str = "") -> dict:
    """``{dotted key: (old, new)}`` for each key whose value differs (``_ABSENT`` where one side lacks it)."""
    a, b = _leaves(old, prefix), _leaves(new, prefix)
    return {key: (a.get(key, _ABSENT), b.get(key, _ABSENT))
            for key in sorted(set(a) | set(b)) if a.get(key, _ABSENT) != b.get(key, _ABSENT)}  # fmt: skip


def _show_change(key: str, old, new) -> str:
    def show(value):
        return "(absent)" if value is _ABSENT else json.dumps(value, default=str)

    return f"{key}: {show(old)} -> {show(new)}"


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for each dotted key whose value differs (``(absent)`` where one side lacks it)."""
    return [_show_change(key, *values) for key, values in _changed_values(old, new, prefix).items()]


def _param_space(spec: SweepSpec, points: list[dict] | None):
    """(param_space, search_alg, num_samples, scheduler) of a fresh experiment."""
    max_epochs = run_config_for(spec, {}).train.max_epochs
    if points is not None:
        grid = {"point": ray.tune.grid_search(points), "seed": ray.tune.grid_search(spec.search.seeds)}
        return grid, None, 1, None
    if spec.search.algorithm == "grid":
        grid = {
            "point": ray.tune.grid_search(grid_points(spec)),
            "seed": ray.tune.grid_search(spec.search.seeds),
        }
        return grid, None, 1, _scheduler(spec, max_epochs)
    num_samples = spec.search.num_samples * len(spec.search.seeds)
    return {}, _searcher(spec), num_samples, _scheduler(spec, max_epochs)


def _new_tuner(
    spec: SweepSpec,
    trainable,
    experiment_uri: str,
    fs,
    path: str,
    points: list[dict] | None,
    data_uri: str | None = None,
):
    param_space, search_alg, num_samples, scheduler = _param_space(spec, points)
    multi = len(spec.search.objectives) > 1
    return ray.tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=ray.tune.TuneConfig(
            metric=None if multi else spec.search.metric,
            mode=None if multi else spec.search.mode,
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent(spec),
            time_budget_s=spec.budget.time_s,
            # a fresh actor per trial costs a process start and the torch/timm imports (~6 s per trial on a
            # 2-core machine, more than a cached-feature trial's fit); the trials of one experiment hold the
            # same resources, so each next trial can take the finished one's actor (bench/trial_startup.py)
            reuse_actors=spec.resources.reuse_actors,
        ),
        run_config=tune_run_config(spec, experiment_uri, fs, path, data_uri),
    )


def tune_run_config(spec: SweepSpec, experiment_uri: str, fs, path: str, data_uri: str | None = None):
    """The Tune RunConfig of a new experiment (a restored one keeps the one it was created with)."""
    return ray.tune.RunConfig(
        name=spec.name,
        storage_path=path,
        storage_filesystem=fs,
        callbacks=[LeaderboardCallback(spec, experiment_uri, data_uri)],
        # a trial that fails (a lost worker or node: a spot reclaim) is re-run from its last checkpoint, up to
        # this many times; within a trial, Train restarts lost workers scaling.max_failures times first
        failure_config=ray.tune.FailureConfig(max_failures=spec.resources.trial_max_failures),
        verbose=1,
    )


def table_from_results(results, spec: SweepSpec, data_uri: str | None = None) -> pd.DataFrame:
    rows = []
    for i, result in enumerate(results):
        trial_id = (result.metrics or {}).get("trial_id") or f"trial_{i:05d}"
        status = "ERROR" if result.error else "TERMINATED"
        rows.append(trial_row(trial_id, status, result.config, result.metrics, spec, data_uri))
    return pd.DataFrame(rows)


# ---- CLI --------------------------------------------------------------------------------------------------

DEFAULT_SPACE = Path(__file__).resolve().parents[3] / "search_spaces" / "default.yaml"
SMOKE_DATA = {"count": 48}  # a smaller synthetic dataset for --smoke


def smoke(spec: SweepSpec) -> SweepSpec:
    """2 trials of 1 epoch on a small dataset: proves the whole path works, in about a minute or two."""
    from molre.config import set_dotted

    spec = spec.model_copy(deep=True)
    for key, value in (("train.max_epochs", 1), ("train.min_epochs", 0)):
        set_dotted(spec.base, key, value)
    spec.name = f"{spec.name}-smoke"
    spec.search.seeds = spec.search.seeds[:1]
    spec.search.num_samples, spec.search.limit = 2, 2
    spec.scheduler.asha = None
    return spec


def add_arguments(parser) -> None:
    parser.add_argument(
        "--config", default=str(DEFAULT_SPACE), help="search-space YAML (default: the embedded default)"
    )
    parser.add_argument(
        "--storage", default="runs", help="results root: local path or s3:// (default: ./runs)"
    )
    parser.add_argument(
        "--resume", action="store_true", help="finish an interrupted experiment of the same name"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="2 trials x 1 epoch on a small synthetic dataset"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec's base run config")


def run(args) -> int:
    from molre.tune.space import load_sweep

    spec = load_sweep(args.config, args.overrides)  # every problem surfaces here, before any trial starts
    spec = smoke(spec) if args.smoke else spec
    table, paths = run_sweep(
        spec, args.storage, resume=args.resume, synthetic=SMOKE_DATA if args.smoke else None
    )
    from molre.tune.leaderboard import finished_trials, ranking_table  # matplotlib: after a spec's checks

    print(f"\nmolre sweep {spec.name}: {len(table)} trials; top rows:")
    print(ranking_table(finished_trials(table), top=8).to_string(index=False))
    for name, uri in paths.items():
        print(f"  {name}: {uri}")
    return 0
