"""On-device augmentation per volume vs MONAI's per-volume CPU path, as one suite case.

Reuses ``bench/augment_bench.py`` (``monai_pipeline``, ``time_per_volume``) with the same parameters and
inputs; see that script for what each side runs. molre: ``augment_batch`` from int16 HU on ``device`` (windowing
+ one batched ``grid_sample``, the elastic field smoothed on a 3x coarser grid, molre's default), and the warp
alone on windowed volumes twice: with that coarse field and with the field smoothed at full resolution
(``elastic_coarse=1``, MONAI's own cost model); MONAI: ``Rand3DElasticd`` + flips + intensity, one volume at a
time on CPU.
"""

from __future__ import annotations

import torch
from augment_bench import monai_pipeline, time_per_volume
from harness import emit, loadavg


def augment_case(
    device: torch.device, batch: int = 4, shape=(32, 128, 128), repeats: int = 3, common: dict | None = None
) -> list[dict]:
    from molre.config import AugmentConfig, DataConfig
    from molre.data.augment import VolumeAugmenter, augment_batch, window_hu

    common = common or {}
    cfg, dcfg = AugmentConfig(), DataConfig()
    hu_cpu = torch.randint(-1000, 2000, (batch, *shape), generator=torch.Generator().manual_seed(0))
    hu_cpu = hu_cpu.to(torch.int16)
    x_cpu = window_hu(hu_cpu, dcfg.windows)
    hu_dev, x_dev = hu_cpu.to(device), x_cpu.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    pipe = monai_pipeline(cfg, seed=0)
    volumes = list(x_cpu)
    molre_s, molre_min = time_per_volume(
        lambda: augment_batch(hu_dev, dcfg, gen, train=True), batch, repeats, device
    )
    warp_s, _ = time_per_volume(lambda: VolumeAugmenter(cfg)(x_dev, gen), batch, repeats, device)
    fullres = VolumeAugmenter(
        cfg, elastic_coarse=1
    )  # the field smoothed at full resolution (MONAI's cost model)
    fullres_s, _ = time_per_volume(lambda: fullres(x_dev, gen), batch, repeats, device)
    monai_s, monai_min = time_per_volume(
        lambda: [pipe({"image": v}) for v in volumes], batch, repeats, torch.device("cpu")
    )
    row = {
        "case": "augment",
        "device": str(device),
        "shape": list(shape),
        "batch": batch,
        "molre_ms_per_volume": round(molre_s * 1e3, 2),
        "molre_ms_per_volume_min": round(molre_min * 1e3, 2),
        "molre_warp_only_ms_per_volume": round(warp_s * 1e3, 2),  # windowed in, molre's coarse field
        "molre_fullres_warp_ms_per_volume": round(fullres_s * 1e3, 2),  # windowed in, elastic_coarse=1
        "monai_cpu_ms_per_volume": round(monai_s * 1e3, 2),
        "monai_cpu_ms_per_volume_min": round(monai_min * 1e3, 2),
        "monai_over_molre": round(monai_s / molre_s, 2),
        "monai_over_molre_fullres": round(monai_s / fullres_s, 2),
        "loadavg": loadavg(),
        **common,
    }
    return [emit(row)]
