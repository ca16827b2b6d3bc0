"""What a sweep trial costs beyond its own work: Tune's actor per trial, with and without actor reuse.

    python bench/trial_startup.py [--config search_spaces/multi_fidelity.yaml] [--e2e-trials 3]
                                  [--storage DIR] [--out FILE.json] [key=value ...]

On the planted data set of ``multifidelity_bench.py`` (128 train / 64 val volumes) and the spec's base config,
in one local Ray, four experiments one trial at a time: every grid point (x seeds) at the cached-feature fidelity
(the multi-fidelity screen), and the first ``--e2e-trials`` points end to end (TorchTrainer), each once with
``resources.reuse_actors`` off (Tune starts an actor, i.e. a Python process that imports torch, timm and molre,
per trial) and once on (a finished trial's actor runs the next). Per experiment: the wall time of ``tuner.fit``,
the trials' summed ``time_total_s`` (what Tune counts: leaves out the actor start) and the mean best AUC, which
must not change with reuse (same seeds, same data). One JSON line per experiment, a summary line with the
off / on ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit, loadavg, write_json  # noqa: E402
from multifidelity_bench import write_planted_dataset  # noqa: E402


def run_stage(spec, stage: str, reuse: bool, data_uri: str, storage_root: str, points=None) -> dict:
    """Fit one experiment of ``stage`` (``screen`` or ``e2e``) with actor reuse on or off; its costs."""
    from molre.data import storage
    from molre.tune import multifidelity as mf
    from molre.tune.space import MultiFidelityConfig
    from molre.tune.sweep import end_to_end_trainable, fit_experiment, table_from_results

    spec = spec.model_copy(deep=True, update={"name": f"{spec.name}-{stage}-reuse{int(reuse)}"})
    spec.resources.reuse_actors = reuse
    experiment_uri = storage.join(storage_root, spec.name)
    if stage == "screen":
        spec.multi_fidelity = spec.multi_fidelity or MultiFidelityConfig()
        cache_root = storage.join(storage_root, "features")
        mf.build_caches(spec, data_uri, cache_root)  # before the clock: the same for both runs
        trainable = mf.screen_trainable(spec, data_uri, experiment_uri, cache_root)
    else:
        spec.multi_fidelity = None
        trainable = end_to_end_trainable(spec, data_uri, experiment_uri)
    started = time.perf_counter()
    results = fit_experiment(spec, trainable, storage_root, resume=False, points=points)
    wall = time.perf_counter() - started
    table = table_from_results(results, spec)
    done = table[table["status"] == "TERMINATED"]
    return {"case": "trial_startup", "stage": stage, "reuse_actors": reuse, "trials": len(table),
            "finished": len(done), "processes": int(table["pid"].nunique()), "wall_s": round(wall, 1),
            "wall_per_trial_s": round(wall / max(len(table), 1), 2),
            "summed_time_total_s": round(float(table["seconds"].sum()), 1),
            "mean_best_auc": round(float(done["val/best_mean_auc"].mean()), 6), "loadavg": loadavg()}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "search_spaces" / "multi_fidelity.yaml"))
    parser.add_argument(
        "--e2e-trials", type=int, default=3, help="end-to-end trials per run (the first points)"
    )
    parser.add_argument("--storage", default=None, help="results root (default: a fresh temporary folder)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "trial_startup.json"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec's base run config")
    args = parser.parse_args(argv)

    from molre.train.run import ensure_ray
    from molre.tune.space import grid_points, load_sweep

    storage_root = args.storage or tempfile.mkdtemp(prefix="molre-bench-startup-")
    data_uri = write_planted_dataset(os.path.join(storage_root, "planted"))
    spec = load_sweep(args.config, [*args.overrides, f"data.uri={data_uri}"])
    spec.resources.max_concurrent_trials = 1
    ensure_ray()
    e2e_points = grid_points(spec)[: args.e2e_trials]
    spec_e2e = spec.model_copy(deep=True)
    spec_e2e.search.seeds = spec.search.seeds[:1]
    rows = []
    for reuse in (False, True):
        rows.append(emit(run_stage(spec, "screen", reuse, data_uri, storage_root)))
        rows.append(emit(run_stage(spec_e2e, "e2e", reuse, data_uri, storage_root, points=e2e_points)))
    by = {(r["stage"], r["reuse_actors"]): r for r in rows}
    summary = {"case": "trial_startup_summary", "config": os.path.relpath(args.config, ROOT),
               "overrides": args.overrides}  # fmt: skip
    for stage in ("screen", "e2e"):
        off, on = by[(stage, False)], by[(stage, True)]
        summary[f"{stage}_wall_off_over_on"] = round(off["wall_s"] / on["wall_s"], 2)
        summary[f"{stage}_same_auc"] = off["mean_best_auc"] == on["mean_best_auc"]
    emit(summary)
    write_json(args.out, {"rows": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
