"""Preprocessing throughput: molre's per-study path vs a plain MONAI dictionary pipeline, same studies, one core.

    python bench/preprocess_bench.py [--count 8] [--shape 40,256,256] [--spacing-in 4,0.9375,0.9375] [--repeats 3]

Studies: ``--count`` synthetic head CTs written as real DICOM series (``molre.data.synth`` when it is installed,
else a procedural ellipsoid head written with ``molre.data.dicom_write``), into a temporary folder.

- molre: ``ingest.load_series`` (pydicom, rescale, validation) + ``resample.align_volume`` (canonical orientation,
  skull centring, trilinear resampling to 4 x 1 x 1 mm onto the fixed 40 x 256 x 256 int16 grid).
- MONAI: ``LoadImaged(PydicomReader) + EnsureChannelFirstd + Orientationd("RAS") + Spacingd((1, 1, 4) mm,
  bilinear)`` on the same series folders.

Both run in this process, single-threaded (OMP/MKL/torch threads = 1, set before numpy/torch load), each warmed
up on one study and then timed over all studies ``--repeats`` times (best repeat reported). Also timed: molre's
resampling step alone against ``scipy.ndimage.affine_transform`` (order 1) and ``torch.nn.functional.grid_sample``
(trilinear) on the same grid, and the shard encoding (zstd Parquet) per volume. One JSON line per case, then the
ratio line (molre volumes/s / MONAI volumes/s; goal >= 2). ``molre_preprocess_inline_end_to_end`` is the whole
``preprocess`` in-process (discovery, labels, hashing, split, alignment, shard writing to a local folder, manifest).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # single core, before numpy / torch are imported

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from molre.data import ingest, preprocess, shards  # noqa: E402
from molre.data.dicom_write import write_dicom_series  # noqa: E402
from molre.data.resample import (  # noqa: E402
    DEFAULT_GRID,
    DEFAULT_SPACING,
    align_volume,
    canonical_orientation,
    clip_hu,
    locate_head,
    resample_to_grid,
)
from molre.findings import FINDING_IDS  # noqa: E402


def write_studies(
    out: Path, count: int, shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[str, Path]:
    """``count`` DICOM series under ``out`` + a generic labels.csv; returns (which generator, labels path)."""
    try:
        from molre.data import synth
    except ImportError:
        synth = None
    if synth is not None:
        labels = synth.generate(out, count=count, seed=0, fmt="dicom", shape=shape)
        return "molre.data.synth", Path(labels)
    lines = [f"study_id,patient_id,{FINDING_IDS[0]}"]
    for i in range(count):
        hu = ellipsoid_head(shape, spacing, seed=i)
        write_dicom_series(hu, spacing, out / f"study_{i:02d}", patient_id=f"p{i}")
        lines.append(f"study_{i:02d},p{i},{i % 2}")
    (out / "labels.csv").write_text("\n".join(lines) + "\n")
    return "ellipsoid head (molre.data.synth not installed)", out / "labels.csv"


def ellipsoid_head(shape, spacing, seed: int) -> np.ndarray:
    """A 150 x 190 x 160 mm (z, y, x) ellipsoidal head in HU: 7 mm skull, textured brain, ventricles; air around."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = np.sqrt(
        ((zz + 20) / 75) ** 2 + ((yy - rng.uniform(-5, 5)) / 95) ** 2 + ((xx - rng.uniform(-5, 5)) / 80) ** 2
    )
    hu = np.where(r < 1.0, 1000.0, -1000.0).astype(np.float32)
    hu[r < 0.93] = 30.0
    hu[(r < 0.93) & (np.abs(xx) < 8) & (np.abs(yy) < 25) & (np.abs(zz) < 20)] = 8.0  # ventricles
    hu += rng.normal(0, 6, shape).astype(np.float32) * (r < 0.93)
    return hu


def time_best(fn, items, repeats: int) -> float:
    """Seconds for one pass of ``fn`` over ``items`` (after a warm-up call), best of ``repeats``."""
    fn(items[0])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best


def molre_step(ref) -> np.ndarray:
    volume = ingest.load_series(ref)
    return align_volume(
        volume.hu, volume.spacing, volume.direction, out_spacing=DEFAULT_SPACING, grid=DEFAULT_GRID
    )


def end_to_end(tmp: Path, labels: Path, run: int) -> None:
    """The whole ``preprocess`` in this process (discover, labels, hashing, split, align, shards, manifest)."""
    out = str(tmp / f"out{run}")
    preprocess.preprocess(
        tmp / "in", labels, "generic", out, salt=b"bench", executor="inline", progress=False
    )


def monai_pipeline():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

    key = "image"
    return Compose(
        [
            LoadImaged(keys=key, reader="PydicomReader"),
            EnsureChannelFirstd(keys=key),
            Orientationd(keys=key, axcodes="RAS"),
            Spacingd(keys=key, pixdim=(1.0, 1.0, 4.0), mode="bilinear"),  # MONAI order: x, y, z
        ]
    )


def resampler_cases(ref) -> dict:
    """The resampling step alone, three ways, on one canonical float32 volume onto the default grid."""
    from scipy import ndimage

    volume = ingest.load_series(ref)
    canon, spacing = canonical_orientation(volume.hu, volume.spacing, volume.direction)
    vol = clip_hu(canon)
    centre = locate_head(vol, spacing).centre_mm
    grid, out = np.array(DEFAULT_GRID), np.array(DEFAULT_SPACING)
    step = out / np.array(spacing)
    first = (np.array(centre) - (grid - 1) / 2 * out) / np.array(spacing)

    def separable(_):
        return resample_to_grid(vol, spacing, centre, DEFAULT_SPACING, DEFAULT_GRID)

    def scipy_affine(_):
        return ndimage.affine_transform(
            vol, step, offset=first, output_shape=tuple(grid), order=1, cval=-1024.0
        )

    src = torch.from_numpy(vol)[None, None]
    axes = [
        torch.tensor(f + s * np.arange(g), dtype=torch.float32)
        for f, s, g in zip(first, step, grid, strict=True)
    ]
    norm = [
        2 * a / (n - 1) - 1 for a, n in zip(axes, vol.shape, strict=True)
    ]  # align_corners=True coordinates
    gz, gy, gx = torch.meshgrid(*norm, indexing="ij")
    sample_grid = torch.stack([gx, gy, gz], dim=-1)[None]

    def torch_grid_sample(_):
        with torch.no_grad():
            shifted = src + 1024.0  # zeros padding == air
            return (
                torch.nn.functional.grid_sample(shifted, sample_grid, mode="bilinear", align_corners=True)
                - 1024.0
            )

    return {
        "separable_numpy": separable,
        "scipy_affine_transform": scipy_affine,
        "torch_grid_sample": torch_grid_sample,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--shape", default="40,256,256", help="D,H,W of the written series")
    parser.add_argument("--spacing-in", default="4,0.9375,0.9375", help="z,y,x mm of the written series")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = tuple(int(v) for v in args.shape.split(","))
    spacing_in = tuple(float(v) for v in args.spacing_in.split(","))
    common = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs", "threads": 1, "count": args.count}

    with tempfile.TemporaryDirectory() as tmp:
        made_by, labels = write_studies(Path(tmp) / "in", args.count, shape, spacing_in)
        refs = [r for r in ingest.discover(Path(tmp) / "in")[0] if r.kind == "dicom"]
        folders = [r.source for r in refs]
        common |= {"studies": made_by, "input_shape": list(ingest.load_series(refs[0]).hu.shape)}

        t_molre = time_best(molre_step, refs, args.repeats)
        pipeline = monai_pipeline()
        t_monai = time_best(lambda folder: pipeline({"image": folder}), folders, args.repeats)
        runs = iter(range(args.repeats + 1))
        t_e2e = time_best(lambda _: end_to_end(Path(tmp), labels, next(runs)), [0], args.repeats)
        cases = {
            "molre_load_align_resample": t_molre,
            "monai_load_orientation_spacing": t_monai,
            "molre_preprocess_inline_end_to_end": t_e2e,
        }
        for name, seconds in cases.items():
            rate = round(len(refs) / seconds, 2)
            print(
                json.dumps(
                    {"case": name, "seconds": round(seconds, 3), "volumes_per_s_per_core": rate} | common
                )
            )
        print(json.dumps({"ratio_molre_over_monai": round(t_monai / t_molre, 2), "goal": 2.0}))

        load_only = time_best(ingest.load_series, refs, args.repeats)
        print(
            json.dumps({"case": "molre_load_only", "ms_per_volume": round(1000 * load_only / len(refs), 1)})
        )
        for name, fn in resampler_cases(refs[0]).items():
            seconds = time_best(fn, list(range(len(refs))), args.repeats)
            print(
                json.dumps(
                    {"case": f"resample_{name}", "ms_per_volume": round(1000 * seconds / len(refs), 1)}
                )
            )
        encode_case(refs, args.repeats)


def encode_case(refs, repeats: int) -> None:
    """zstd Parquet encoding of the aligned volumes: ms per volume and compression."""
    zeros, ones = np.zeros(75), np.ones(75)
    rows = [shards.make_row("s", "p", "train", molre_step(r), DEFAULT_SPACING, zeros, ones) for r in refs]
    seconds = time_best(lambda _: shards.shard_bytes(rows), [0], repeats)
    size = len(shards.shard_bytes(rows))
    raw = sum(len(r["volume"]) for r in rows)
    line = {"case": "shard_encode_zstd", "ms_per_volume": round(1000 * seconds / len(rows), 1)}
    line |= {"compression_ratio": round(raw / size, 2), "mb_per_volume": round(size / len(rows) / 2**20, 2)}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
