"""Does an FP8 frozen base cost accuracy? ``train.frozen_matmul`` auto vs fp8, paired over seeds, end to end.

    python bench/fp8_numerics.py [--config search_spaces/frozen_matmul.yaml] [--train N --val N]
                                 [--data-seed N] [--seeds N] [--storage DIR] [--out FILE.json] [key=value ...]

Runs the spec (a grid over ``train.frozen_matmul`` x seeds, every trial a full TorchTrainer run) in a local Ray
on the planted benchmark of ``multifidelity_bench`` (eight findings planted as discs of graded contrast: a set on
which runs learn, unlike the random-backbone phantoms). For each seed both arms see the same data order and
initialisation, so ``fp8 - auto`` per seed is FP8's effect; it is set against the seed-to-seed spread of each arm
(the noise a difference has to exceed). Prints one JSON line and writes it to ``bench/results/``.

On this CPU machine ``auto`` is fp32, so the comparison is e4m3 products vs fp32 ones (on a GPU: vs bf16); the
speed of FP8 is ``bench/run.py --suite gpu --cases model_step`` (``molre-fp8`` rows), not this script's business.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import loadavg, machine  # noqa: E402

ARM = "config/train.frozen_matmul"
SEED = "config/train.seed"


def paired_difference(table: pd.DataFrame, metric: str, arms=("auto", "fp8")) -> dict:
    """Per-seed ``metric`` of each arm (finished trials only), ``arms[1] - arms[0]`` per seed, and its summary.

    Seeds where either arm did not finish are left out (and counted)."""
    done = table[table["status"] == "TERMINATED"]
    wide = done.pivot_table(index=SEED, columns=ARM, values=metric, aggfunc="first")
    missing = [a for a in arms if a not in wide.columns]
    if missing:
        raise ValueError(f"no finished trial with {ARM} = {missing}")
    both = wide[list(arms)].dropna()
    diff = both[arms[1]] - both[arms[0]]
    n = len(diff)
    out = {
        "seeds": [int(s) for s in both.index],
        "seeds_left_out": int(table[SEED].nunique() - n),
        **{f"{a}_per_seed": [round(float(v), 4) for v in both[a]] for a in arms},
        **{f"{a}_mean": round(float(both[a].mean()), 4) for a in arms},
        **{f"{a}_seed_std": round(float(both[a].std(ddof=1)), 4) if n > 1 else None for a in arms},
        "diff_per_seed": [round(float(d), 4) for d in diff],
        "diff_mean": round(float(diff.mean()), 4),
        "diff_std": round(float(diff.std(ddof=1)), 4) if n > 1 else None,
    }
    out["diff_stderr"] = round(out["diff_std"] / np.sqrt(n), 4) if n > 1 else None
    return out


def per_finding_difference(table: pd.DataFrame, arms=("auto", "fp8")) -> dict:
    """Mean over seeds of |AUC(fp8) - AUC(auto)| per finding with a defined AUC in both arms: the largest and the
    mean over findings (a change hidden in the mean AUC would show here)."""
    done = table[table["status"] == "TERMINATED"]
    cols = [c for c in done.columns if c.startswith("auc/")]
    by = {a: done[done[ARM] == a].set_index(SEED)[cols] for a in arms}
    seeds = by[arms[0]].index.intersection(by[arms[1]].index)
    delta = (by[arms[1]].loc[seeds] - by[arms[0]].loc[seeds]).abs().mean().dropna()
    if delta.empty:
        return {}
    return {"finding_abs_diff_mean": round(float(delta.mean()), 4),
            "finding_abs_diff_max": round(float(delta.max()), 4), "finding_max": delta.idxmax()[4:],
            "findings_compared": len(delta)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "search_spaces" / "frozen_matmul.yaml"))
    parser.add_argument("--storage", default=None, help="results root (default: a fresh temporary folder)")
    parser.add_argument("--train", type=int, default=128, help="planted training volumes")
    parser.add_argument("--val", type=int, default=128, help="planted validation volumes")
    parser.add_argument("--data-seed", type=int, default=0, help="the draw of the planted data set")
    parser.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default: the spec's)")
    parser.add_argument("--out", default=None, help="default: bench/results/<spec name>-planted.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec's base run config")
    args = parser.parse_args(argv)

    import torch
    from multifidelity_bench import write_planted_dataset

    from molre.train.run import ensure_ray
    from molre.tune.space import load_sweep
    from molre.tune.sweep import run_sweep

    storage_root = args.storage or tempfile.mkdtemp(prefix="molre-bench-fp8-")
    counts = {"train": args.train, "val": args.val}
    data = write_planted_dataset(os.path.join(storage_root, "planted"), counts, seed=args.data_seed)
    spec = load_sweep(args.config, [*args.overrides, f"data.uri={data}"])
    if args.seeds:
        spec.search.seeds = list(range(args.seeds))
    ensure_ray()
    started = time.time()
    table, _ = run_sweep(spec, storage_root)
    wall = time.time() - started
    seconds = table[table["status"] == "TERMINATED"].groupby(ARM)["seconds"].mean()
    row = {"case": "fp8_numerics", "config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
           "data": f"planted train={args.train} val={args.val} seed={args.data_seed}", "metric": spec.search.metric,
           **paired_difference(table, spec.search.metric), **per_finding_difference(table),
           "trial_seconds_mean": {k: round(float(v), 1) for k, v in seconds.items()},
           "wall_seconds": round(wall, 1), "loadavg": loadavg(),
           **machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
           "storage": storage_root}  # fmt: skip
    print(json.dumps(row), flush=True)
    out = Path(args.out or ROOT / "bench" / "results" / f"{spec.name}-planted.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
