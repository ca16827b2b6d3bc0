"""Per-volume cost of molre's batched on-device augmentation vs MONAI's per-volume CPU dictionary path.

    python bench/augment_bench.py [--device cpu|cuda] [--batch 8] [--shape 32,224,224] [--repeats 3]

Both sides get the same windowed ``[3, D, H, W]`` float32 volumes and the paper's parameters (molre.config
AugmentConfig defaults): elastic alpha 0..200 / sigma 10..13 voxels, rotation +-0.1 rad per axis, anisotropic scale
0.85..1.15, flips p=0.5 per axis, brightness x[0.99, 1.01], Gaussian noise. MONAI: ``Rand3DElasticd`` (with its
rotate/scale affine) + ``RandFlipd`` x3 + ``RandScaleIntensityd`` + ``RandGaussianNoised``, one volume at a time on
CPU, as a Dataset/DataLoader worker would run it. molre: one ``VolumeAugmenter`` call per batch on ``--device``;
also with the elastic field smoothed at full resolution (``elastic_coarse=1``, MONAI's own cost model) and the full
``augment_batch`` from int16 HU (windowing included). Every case is warmed up once, then timed over ``--repeats``
batches (median reported, and the minimum); one JSON line per case, then one line of ratios (MONAI per-volume time / molre per-volume time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from molre.config import AugmentConfig, DataConfig
from molre.data.augment import VolumeAugmenter, augment_batch, window_hu


def monai_pipeline(cfg: AugmentConfig, seed: int):
    """MONAI's dictionary transforms with the same ranges (noise std ~ U(0, sqrt(max variance)) in MONAI)."""
    from monai.transforms import Compose, Rand3DElasticd, RandFlipd, RandGaussianNoised, RandScaleIntensityd

    key = "image"
    pipeline = Compose(
        [
            Rand3DElasticd(
                keys=key,
                sigma_range=cfg.elastic_sigma,
                magnitude_range=cfg.elastic_alpha,
                prob=1.0,
                rotate_range=(cfg.rotate,) * 3,
                scale_range=(cfg.scale[1] - 1.0,) * 3,
                mode="bilinear",
                padding_mode="zeros",
            ),
            *[RandFlipd(keys=key, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)],
            RandScaleIntensityd(
                keys=key, factors=(cfg.brightness[0] - 1.0, cfg.brightness[1] - 1.0), prob=1.0
            ),
            RandGaussianNoised(keys=key, prob=1.0, mean=0.0, std=math.sqrt(cfg.noise_variance[1])),
        ]
    )
    pipeline.set_random_state(seed=seed)
    return pipeline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_per_volume(run_batch, volumes: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median, min) seconds per volume over ``repeats`` timed batches, after one warm-up batch.

    The median (not the mean) keeps a burst of load from a neighbouring process out of the figure.
    """
    run_batch()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_batch()
        _sync(device)
        times.append((time.perf_counter() - start) / volumes)
    return statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--shape", default="32,224,224", help="D,H,W of each volume")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float16"], help="molre data dtype (GPU)"
    )
    ap.add_argument("--skip-monai", action="store_true")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    cfg = AugmentConfig()
    dcfg = DataConfig()
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    hu_cpu = torch.randint(-1000, 2000, (args.batch, *shape), generator=torch.Generator().manual_seed(0))
    hu_cpu = hu_cpu.to(torch.int16)
    x_cpu = window_hu(hu_cpu, dcfg.windows)  # [B,3,D,H,W] float32
    x_dev, hu_dev = x_cpu.to(device, dtype), hu_cpu.to(device)
    common = {
        "shape": list(shape),
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    cases = {
        "molre_batched": lambda: VolumeAugmenter(cfg)(x_dev, gen),
        "molre_batched_fullres_field": lambda: VolumeAugmenter(cfg, elastic_coarse=1)(x_dev, gen),
        "molre_augment_batch_from_int16": lambda: augment_batch(hu_dev, dcfg, gen, train=True, dtype=dtype),
    }
    if not args.skip_monai:
        pipe = monai_pipeline(cfg, seed=0)
        volumes = list(x_cpu)  # [3,D,H,W] each, CPU
        cases["monai_cpu_dict_per_volume"] = lambda: [pipe({"image": v}) for v in volumes]

    results: dict[str, float] = {}
    for name, run_batch in cases.items():
        dev = torch.device("cpu") if name.startswith("monai") else device
        sec, best = time_per_volume(run_batch, args.batch, args.repeats, dev)
        results[name] = sec
        where = "cpu" if name.startswith("monai") else str(device)
        row = {
            "case": name,
            "device": where,
            "ms_per_volume": round(sec * 1e3, 2),
            "ms_per_volume_min": round(best * 1e3, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "dtype": args.dtype,
            **common,
        }
        print(json.dumps(row), flush=True)
    if "monai_cpu_dict_per_volume" in results:
        ref = results["monai_cpu_dict_per_volume"]
        ratios = {f"monai_over_{k}": round(ref / v, 2) for k, v in results.items() if k.startswith("molre")}
        print(
            json.dumps({"case": "speedup_vs_monai_cpu", "device": str(device), **ratios, **common}),
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
