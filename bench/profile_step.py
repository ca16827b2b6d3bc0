"""Where one model step's GPU time goes: the molre step of model_step.py under torch.profiler, top kernels.

    python bench/profile_step.py --shape dinov3-base=8x32 [--compile regional|off] [--top 25]

Prints the profiler's table sorted by device time (self), and the share of the step spent in matrix products
(``gemm``/``mm`` kernels), attention (``flash``/``fmha``/``attention``) and everything else.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from model_step import Variant, make_batch, make_step, molre_model, run_config  # noqa: E402
from run import parse_shape  # noqa: E402


def kernel_family(name: str) -> str:
    low = name.lower()
    if any(k in low for k in ("flash", "fmha", "attention", "sdpa")):
        return "attention"
    if any(k in low for k in ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "_mm_")):
        return "matmul"
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=parse_shape, default=parse_shape("dinov3-base=8x32"))
    ap.add_argument("--compile", default="regional", choices=["regional", "off"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    from molre.train.loss import FocalLoss

    device = torch.device("cuda")
    cfg = run_config(args.shape)
    model, opt = molre_model(cfg, device, compile=args.compile)
    v = Variant(
        "molre", "molre", "regional" if args.compile == "regional" else "eager", model, opt, bf16=True
    )
    step = make_step(v, make_batch(args.shape, device), FocalLoss(2.0, 0.25), device)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=90))
    share: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            fam = kernel_family(e.key)
            share[fam] = share.get(fam, 0.0) + e.self_device_time_total
    total = sum(share.values()) or 1.0
    per_step_ms = total / args.steps / 1e3
    print({"shape": args.shape.label(), "compile": args.compile, "device_ms_per_step": round(per_step_ms, 2),
           **{f"{k}_pct": round(100 * s / total, 1) for k, s in sorted(share.items())}})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
