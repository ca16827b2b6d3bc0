"""Does an FP8 frozen base cost accuracy? ``train.frozen_matmul`` auto vs fp8, paired over seeds, end to end.

    python bench/fp8_numerics.py [--config search_spaces/frozen_matmul.yaml] [--train N --val N]
                                 [--data-seed N] [--seeds N] [--layer-scale G] [--storage DIR]
                                 [--out FILE.json] [key=value ...]

Runs the spec (a grid over ``train.frozen_matmul`` x seeds, every trial a full TorchTrainer run) in a local Ray
on the planted benchmark of ``multifidelity_bench`` (eight findings planted as discs of graded contrast: a set on
which runs learn, unlike the random-backbone phantoms). For each seed both arms see the same data order and
initialisation, so ``fp8 - auto`` per seed is FP8's effect; it is set against the seed-to-seed spread of each arm
(the noise a difference has to exceed). Prints one JSON line and writes it to ``bench/results/``.

Weights: the preset's random initialisation, with every LayerScale set to ``--layer-scale`` (default 1) and
saved in the real format (``backbone.weights``). timm's DINOv3 architecture initialises LayerScale at 1e-5, so a
random ``tiny-vit``'s blocks add ~1e-5 of their output to the residual stream: its features are the patch
embedding's to 9e-7, and neither FP8 nor LoRA in the blocks could change anything (a first run at the random
init gave the same AUCs in both arms to 4 decimals). Trained DINOv3 weights have LayerScales far from 1e-5;
``--layer-scale 0`` keeps the random init's.

On this CPU machine ``auto`` is fp32, so the comparison is e4m3 products vs fp32 ones (on a GPU: vs bf16); the
speed of FP8 is ``bench/run.py --suite gpu --cases model_step`` (``molre-fp8`` rows), not this script's business.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import loadavg, machine, write_json  # noqa: E402

ARM = "config/train.frozen_matmul"
SEED = "config/train.seed"


def write_weights(path: str, preset: str, layer_scale: float, seed: int = 0) -> str:
    """The preset's random backbone (``seed``) with every LayerScale gamma set to ``layer_scale`` (0: left as
    initialised), saved as safetensors in the layout ``backbone.weights`` reads."""
    import torch
    from safetensors.torch import save_file

    from molre.models import create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone(preset)
    state = backbone.net.state_dict()
    if layer_scale:
        # timm LayerScale: ls1.gamma / ls2.gamma (ViT), gamma_1 / gamma_2 (Eva, the DINOv3 models)
        gammas = [k for k in state if re.search(r"\.gamma(_\d)?$", k)]
        if not gammas:
            raise ValueError(f"{preset} has no LayerScale (.gamma / .gamma_N) to set; pass --layer-scale 0")
        state.update({k: torch.full_like(state[k], layer_scale) for k in gammas})
    save_file({f"net.{k}": v.contiguous() for k, v in state.items()}, path)
    return path


def feature_change(cfg, volumes: int = 8) -> float:
    """Relative change (in norm) of the frozen backbone's slice features when its linears run in FP8, on the
    first ``volumes`` validation volumes: how much the arm perturbs what the adapters and head see."""
    import copy

    import torch

    from molre.models.fp8 import convert_frozen_linears
    from molre.tune import features

    backbone, input_size, _ = features._frozen_backbone(cfg, torch.device("cpu"))
    fp8 = copy.deepcopy(backbone)
    convert_frozen_linears(fp8)
    items = [v for _, v in zip(range(volumes), features.volumes_of(cfg, "val"), strict=False)]
    x = features.model_input(torch.from_numpy(np.stack([v[0] for v in items])), cfg, input_size)
    exact, quantised = (features.backbone_features(b, x, cfg) for b in (backbone, fp8))
    return float((quantised - exact).norm() / exact.norm())


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
    parser.add_argument(
        "--layer-scale", type=float, default=1.0, help="LayerScale of the random weights (0: init)"
    )
    parser.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 (default: the spec's)")
    parser.add_argument("--out", default=None, help="default: bench/results/<spec name>-planted.json")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the spec's base run config")
    args = parser.parse_args(argv)

    import torch
    from multifidelity_bench import write_planted_dataset

    from molre.config import build_config
    from molre.train.run import ensure_ray
    from molre.tune.space import load_sweep, run_config_for
    from molre.tune.sweep import run_sweep

    storage_root = args.storage or tempfile.mkdtemp(prefix="molre-bench-fp8-")
    counts = {"train": args.train, "val": args.val}
    data = write_planted_dataset(os.path.join(storage_root, "planted"), counts, seed=args.data_seed)
    overrides = [*args.overrides, f"data.uri={data}"]
    preset = build_config(load_sweep(args.config, overrides).base).backbone.preset
    weights = write_weights(os.path.join(storage_root, f"{preset}.safetensors"), preset, args.layer_scale)
    spec = load_sweep(args.config, [*overrides, f"backbone.weights={weights}"])
    if args.seeds:
        spec.search.seeds = list(range(args.seeds))
    ensure_ray()
    started = time.time()
    table, _ = run_sweep(spec, storage_root)
    wall = time.time() - started
    seconds = table[table["status"] == "TERMINATED"].groupby(ARM)["seconds"].mean()
    row = {"case": "fp8_numerics", "config": os.path.relpath(args.config, ROOT), "overrides": args.overrides,
           "data": f"planted train={args.train} val={args.val} seed={args.data_seed}", "metric": spec.search.metric,
           "weights": f"random, LayerScale {args.layer_scale or 'as initialised'}",
           "feature_rel_change": round(feature_change(run_config_for(spec, {}, 0)), 5),
           **paired_difference(table, spec.search.metric), **per_finding_difference(table),
           "trial_seconds_mean": {k: round(float(v), 1) for k, v in seconds.items()},
           "wall_seconds": round(wall, 1), "loadavg": loadavg(),
           **machine(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
           "storage": storage_root}  # fmt: skip
    print(json.dumps(row), flush=True)
    write_json(args.out or ROOT / "bench" / "results" / f"{spec.name}-planted.json", row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
