"""molre benchmark suite: one JSON line per case on stdout, and the tables in BENCHMARKS.md.

    python bench/run.py --suite cpu                      # tiny presets on CPU (this writes BENCHMARKS.md)
    python bench/run.py --suite gpu                      # dinov3-base / dinov3-large / medgemma on a GPU
    python bench/run.py --suite gpu --quick --device cpu # the GPU suite's cases at toy sizes: a plumbing check
    python bench/run.py --suite cpu --quick --md /tmp/B.md --write   # toy sizes (the test runs this)

Cases (``--cases`` picks a subset): ``flops`` (FLOPs per slice-step of the GPU shapes and the suite's own,
counted on the meta device, so any machine gives them), ``model_step`` (molre vs the timm + peft peer, eager,
compiled and regionally compiled: slices/s, FLOPs counted by FlopCounterMode, peak memory, and what each fast path
gives; see model_step.py), ``blocks`` (MoLRE ``blocks`` placement routed by slice and by token vs LoRA),
``train_epoch`` (full Ray Train epoch vs the pure step; train_epoch.py), ``augment`` (on-device augmentation vs
MONAI's CPU path; augment_case.py), ``features`` (a cached-feature trial vs the end-to-end trial it stands in for;
features_case.py). The first line is the machine; every row carries ``os.getloadavg()``. A failing case prints ``{"case": ..., "error": ...}``, the others still run, exit code 1.

``--quick`` shrinks every case to toy sizes and does not touch BENCHMARKS.md unless ``--write`` is given.
The full suites rewrite only their own block (between ``<!-- bench/run.py <suite>: begin/end -->``) of the
section "## Model step and training throughput"; every other section is kept as it is.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from harness import emit, loadavg, machine, write_json  # noqa: E402
from model_step import StepShape  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Model step and training throughput"
CASES = ("flops", "model_step", "blocks", "train_epoch", "augment", "features")
MODES = ("eager", "compiled", "regional")


@dataclass
class Suite:
    """Sizes of every case for one suite (full or --quick)."""

    steps: list[StepShape]
    blocks: list[StepShape]
    modes: tuple[str, ...] = MODES
    ablations: bool = False  # model_step: molre eager with each fast path switched off (model_step.py)
    fp8: bool = False  # model_step: also molre with train.frozen_matmul=fp8 in every mode
    rounds: int = 3
    repeats: int = 5
    warmup: int = 2
    epoch: dict = field(default_factory=dict)  # train_epoch_case kwargs
    augment: dict = field(default_factory=dict)  # augment_case kwargs
    features: dict = field(default_factory=dict)  # features_case kwargs


def suite_config(name: str, quick: bool) -> Suite:
    if name == "cpu" and not quick:
        return Suite(
            steps=[StepShape("tiny-vit", 2, 8), StepShape("tiny-vit", 4, 32), StepShape("tiny-davit", 2, 8)],
            blocks=[StepShape("tiny-vit", 2, 8), StepShape("tiny-vit", 4, 32)],
            ablations=True,
            epoch={
                "preset": "tiny-vit",
                "grid": (8, 64, 64),
                "counts": {"train": 48, "val": 8},
                "batch_size": 2,
                "workers": (1, 2),
                "epochs": 5,
                "fast_poll_s": 0.25,
                "repeats": 20,
            },  # fmt: skip
            augment={"batch": 4, "shape": (32, 128, 128), "repeats": 3},
            features={
                "preset": "tiny-vit",
                "grid": (8, 64, 64),
                "counts": {"train": 48, "val": 16},
                "epochs": 4,
                "batch_size": 2,
            },  # fmt: skip
        )
    if name == "cpu":  # toy sizes: what the test runs
        return Suite(
            steps=[StepShape("tiny-vit", 1, 4)], blocks=[StepShape("tiny-vit", 1, 4)], modes=("eager",),
            rounds=1, repeats=2, warmup=1,
            epoch={"preset": "tiny-vit", "grid": (4, 64, 64), "counts": {"train": 6, "val": 2},
                   "batch_size": 2, "workers": (1,), "epochs": 2, "repeats": 1},
            augment={"batch": 1, "shape": (8, 32, 32), "repeats": 1},
            features={"preset": "tiny-vit", "grid": (4, 64, 64), "counts": {"train": 6, "val": 4},
                      "epochs": 2, "batch_size": 2},
        )  # fmt: skip
    if name == "gpu" and not quick:
        return Suite(
            steps=[StepShape("dinov3-base", 8, 32), StepShape("dinov3-large", 4, 32), StepShape("medgemma", 1, 8)],
            blocks=[StepShape("dinov3-base", 8, 32)], ablations=True, fp8=True,
            rounds=3, repeats=10, warmup=3,
            epoch={"preset": "dinov3-base", "grid": (32, 224, 224), "spacing": (4.0, 1.0, 1.0),
                   "counts": {"train": 64, "val": 8}, "batch_size": 8, "workers": (1,), "epochs": 4},
            augment={"batch": 8, "shape": (32, 224, 224), "repeats": 5},
            features={"preset": "dinov3-base", "grid": (32, 224, 224), "spacing": (4.0, 1.0, 1.0),
                      "counts": {"train": 64, "val": 16}, "epochs": 3, "batch_size": 8},
        )  # fmt: skip
    if name == "gpu":  # the GPU cases at toy sizes (real architectures, 112^2 slices): runs on CPU too
        return Suite(
            steps=[StepShape("dinov3-base", 1, 2, 112), StepShape("dinov3-large", 1, 2, 112),
                   StepShape("medgemma", 1, 1, 112)],
            blocks=[StepShape("dinov3-base", 1, 2, 112)], modes=("eager",), rounds=1, repeats=1, warmup=1, fp8=True,
            epoch={"preset": "dinov3-base", "grid": (2, 112, 112), "spacing": (4.0, 2.0, 2.0),
                   "counts": {"train": 3, "val": 2}, "batch_size": 1, "workers": (1,), "epochs": 2, "repeats": 1},
            augment={"batch": 1, "shape": (8, 64, 64), "repeats": 1},
            features={"preset": "dinov3-base", "grid": (2, 112, 112), "spacing": (4.0, 2.0, 2.0),
                      "counts": {"train": 4, "val": 4}, "epochs": 2, "batch_size": 2},
        )  # fmt: skip
    raise ValueError(f"unknown suite {name!r}")


def parse_shape(text: str) -> StepShape:
    """``preset=VxS`` or ``preset=VxS@side`` -> StepShape."""
    m = re.fullmatch(r"([\w.-]+)=(\d+)x(\d+)(?:@(\d+))?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected preset=VOLUMESxSLICES[@SIDE]")
    return StepShape(m[1], int(m[2]), int(m[3]), int(m[4]) if m[4] else None)


def apply_options(suite: Suite, args) -> Suite:
    """The command line's --shape, --no-compile / --modes and --epoch-train over a suite's sizes."""
    if args.shape:
        suite.steps = args.shape
    if args.no_compile:
        suite.modes = ("eager",)
    elif args.modes:
        suite.modes = tuple(args.modes)
    if args.fp8:
        suite.fp8 = True
    if args.epoch_train:
        suite.epoch["counts"] = {**suite.epoch["counts"], "train": args.epoch_train}
    return suite


def run_suite(args) -> list[dict]:
    device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    suite = apply_options(suite_config(args.suite, args.quick), args)
    common = {"suite": args.suite + ("-quick" if args.quick else "")}
    if args.compile_mode:
        common["compile_mode"] = args.compile_mode
    rows = [
        emit({"case": "machine", "device": str(device), **machine(device), "loadavg": loadavg(), **common})
    ]
    wanted = args.cases or CASES
    for case in wanted:
        try:
            rows += run_case(case, suite, device, args, common)
        except Exception as err:  # keep going: one broken case must not hide the others' figures
            traceback.print_exc(file=sys.stderr)
            rows.append(
                emit({"case": case, "error": f"{type(err).__name__}: {err}", "loadavg": loadavg(), **common})
            )
    return rows


def run_case(case: str, suite: Suite, device: torch.device, args, common: dict) -> list[dict]:
    timing = {"rounds": suite.rounds, "repeats": suite.repeats, "warmup": suite.warmup, "common": common}
    if "compile_mode" in common:  # torch.compile's mode for the compiled / regional variants
        timing["compile_kwargs"] = {"mode": common["compile_mode"]}
    if case == "flops":  # counted on the meta device: the GPU shapes' FLOPs on any machine
        from model_step import flops_case

        shapes = args.shape or list(dict.fromkeys(suite_config("gpu", quick=False).steps + suite.steps))
        return flops_case(shapes, common=common)
    if case == "model_step":
        from model_step import model_step_case

        return [r for s in suite.steps
                for r in model_step_case(s, device, modes=suite.modes, ablations=suite.ablations, fp8=suite.fp8,
                                         **timing)]  # fmt: skip
    if case == "blocks":
        from model_step import blocks_overhead_case

        return [r for s in suite.blocks for r in blocks_overhead_case(s, device, modes=suite.modes, **timing)]
    if case == "train_epoch":
        from train_epoch import train_epoch_case

        return train_epoch_case(device=device, num_cpus=args.num_cpus, common=common, **suite.epoch)
    if case == "augment":
        from augment_case import augment_case

        return augment_case(device, common=common, **suite.augment)
    if case == "features":
        from features_case import features_case

        return features_case(device=device, num_cpus=args.num_cpus, common=common, **suite.features)
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


# ---- BENCHMARKS.md -------------------------------------------------------------------------------------------


def _si(value: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def _load(rows: list[dict]) -> str:
    ones = [r["loadavg"][0] for r in rows if "loadavg" in r]
    return f"{min(ones):.1f}..{max(ones):.1f}" if ones else "n/a"


def render_block(suite: str, results: dict[str, dict]) -> str:
    """Markdown for one suite from ``results`` (case -> {"rows", "command", "date", "machine"})."""
    everything = [r for case in CASES if case in results for r in results[case]["rows"]]
    rows = [r for r in everything if "error" not in r]
    out = [f"### {suite.upper()} suite", ""]
    runs: dict[tuple, list[str]] = {}
    for case in CASES:
        if case in results:
            res = results[case]
            info = res["machine"]
            where = f"GPU {info['gpu']}, " if info.get("gpu") else ""
            machine_text = (f"{where}{info['cpu']}, {info['cores']} cores, torch {info['torch']} "
                            f"({info['threads']} intra-op threads)")  # fmt: skip
            runs.setdefault((machine_text, res["date"], res["command"]), []).append(
                f"{case} (load {_load(res['rows'])})"
            )
    for (machine_text, date, command), cases in runs.items():
        out += [f"- `{command}`: {', '.join(cases)}; {machine_text}; {date}."]
    out += [
        "",
        "Load = 1-minute load average (min..max over the case's rows; each row's own in its table).",
        "",
    ]
    for render in CASE_TABLES:
        out += render(rows)
    errors = [r for r in everything if "error" in r]
    for r in errors:
        out.append(f"Case `{r['case']}` failed: `{r['error']}`.")
    return "\n".join(out).rstrip() + "\n"


def _table(title: str, header: str, lines: list[str]) -> list[str]:
    """Markdown lines: ``title``, a blank line, a table (its separator sized from ``header``), a blank line;
    nothing when there are no ``lines``."""
    if not lines:
        return []
    return [title, "", header, "|" + "---|" * (header.count("|") - 1), *lines, ""]


def _subtable(title: str, header: str, lines: list[str]) -> list[str]:
    """A table that continues the one above it: a blank line first, none after (nothing without ``lines``)."""
    return [""] + _table(title, header, lines)[:-1] if lines else []


def _of(rows: list[dict], case: str) -> list[dict]:
    return [r for r in rows if r["case"] == case]


def _model_step_md(rows: list[dict]) -> list[str]:
    steps, ratios = _of(rows, "model_step"), _of(rows, "model_step_ratio")
    if not steps:
        return []
    lines = [
        f"| {r['preset']} | {r['input']} | {r['impl']} | {r['mode']} | {r['slices_per_s']:.1f} | "
        f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}) / {r['cpu_ms_per_step']:.1f} | "
        f"{r['gflop_per_slice_step']:.4g} | {_si(r['achieved_gflops'] * 1e9, 'FLOP/s')} | "
        f"{r['peak_mem_mib']:.0f} MiB ({r['mem_method']}) | {r['loadavg'][0]:.1f} |"
        for r in steps
    ]
    out = _table("**Model step** (forward + backward + AdamW). Step ms: median wall (fastest) / process CPU ms "
                 "(all threads); slices/s and achieved FLOP/s from the median wall step.",
                 "| preset | input (B x S x side^2) | impl | mode | slices/s | step ms | GFLOP / slice-step "
                 "(counted) | achieved FLOP/s | peak memory | load 1m |", lines)  # fmt: skip
    return out[:-1] + _ratios_md(ratios) + _fp8_md(ratios) + _ablations_md(ratios) + [""]


def _ratios_md(ratios: list[dict]) -> list[str]:
    """molre / peer per compile mode (the sub-table of the model step)."""
    modes = list(dict.fromkeys(k.removeprefix("molre_over_peer_") for r in ratios for k in r
                               if k.startswith("molre_over_peer_") and not k.endswith(("_from_min", "_from_cpu"))))  # fmt: skip
    lines = []
    for r in ratios:
        cells = " | ".join(
            f"{r[f'molre_over_peer_{m}']:.2f}x ({r[f'molre_over_peer_{m}_from_min']:.2f}x; "
            f"{r[f'molre_over_peer_{m}_from_cpu']:.2f}x)"
            if f"molre_over_peer_{m}" in r
            else "-"  # a shape run without this mode
            for m in modes
        )
        lines.append(f"| {r['preset']} | {r['input']} | {cells} | {r['best_molre_over_best_peer']:.2f}x |")
    header = ("| preset | input | " + " | ".join(f"molre / peer, {m}" for m in modes)
              + " | best molre / best peer (median wall) |")  # fmt: skip
    return _subtable("molre / peer throughput: from the median wall steps (from the fastest steps; from CPU "
                     "time per step):", header, lines)  # fmt: skip


def _fp8_md(ratios: list[dict]) -> list[str]:
    """molre with FP8 frozen matmuls over molre and over the peer, per compile mode (a sub-table of the step)."""
    modes = list(dict.fromkeys(k.removeprefix("fp8_over_molre_") for r in ratios for k in r
                               if k.startswith("fp8_over_molre_") and not k.endswith(("_from_min", "_from_cpu"))))  # fmt: skip

    def cell(r: dict, key: str) -> str:
        return (
            f"{r[key]:.2f}x ({r[key + '_from_min']:.2f}x; {r[key + '_from_cpu']:.2f}x)" if key in r else "-"
        )

    lines = [
        f"| {r['preset']} | {r['input']} | "
        + " | ".join(cell(r, f"fp8_over_molre_{m}") for m in modes)
        + " | "
        + " | ".join(cell(r, f"fp8_over_peer_{m}") for m in modes)
        + f" | {r['best_fp8_over_best_peer']:.2f}x |"
        for r in ratios
        if "best_fp8_over_best_peer" in r
    ]
    header = ("| preset | input | " + " | ".join(f"fp8 / molre, {m}" for m in modes) + " | "
              + " | ".join(f"fp8 / peer, {m}" for m in modes) + " | best fp8 / best peer (median wall) |")  # fmt: skip
    return _subtable("FP8 frozen matmuls (`molre-fp8` = molre with `train.frozen_matmul=fp8`) over molre and over "
                     "the peer, from the median wall steps (from the fastest steps; from CPU time per step):",
                     header, lines)  # fmt: skip


def _ablations_md(ratios: list[dict]) -> list[str]:
    """What each fast path gives (the sub-table of the model step)."""
    lines = [
        f"| {r['preset']} | {r['input']} | {key.removeprefix('speedup_vs_')} | "
        f"{r[key]:.3f}x ({r[key + '_from_min']:.3f}x; {r[key + '_from_cpu']:.3f}x) |"
        for r in ratios
        for key in [k for k in r if k.startswith("speedup_vs_") and not k.endswith(("_min", "_cpu"))]
    ]
    return _subtable("What each fast path gives: molre eager (the device's defaults) / molre eager with one "
                         "setting changed, from the median wall step (the fastest step; CPU time per step); > 1 = "
                         "the default is faster. `fp32-frozen` = frozen weights kept fp32 and re-cast by bf16 "
                         "autocast every step (GPU); `foreach-adamw` / `fused-adamw` = the other AdamW than the "
                         "device's default (fused on CUDA, foreach on CPU).",
                         "| preset | input | changed | default / changed |", lines)  # fmt: skip


def _flops_md(rows: list[dict]) -> list[str]:
    flops = _of(rows, "flops")
    if not flops:
        return []
    limit = flops[0]["limit_tflops"]
    lines = []
    for r in flops:
        token = (f"{r['blocks_token_gflop_per_slice_step']:.4g} ({r['blocks_token_flop_overhead_pct']:+.1f}%)"
                 if "blocks_token_gflop_per_slice_step" in r else "-")  # fmt: skip
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['molre_gflop_per_slice_step']:.4g} | "
            f"{r['peer_gflop_per_slice_step']:.4g} | {r['lora_gflop_per_slice_step']:.4g} | "
            f"{r['blocks_gflop_per_slice_step']:.4g} ({r['blocks_flop_overhead_pct']:+.1f}%) | {token} | "
            f"{r['molre_trainable_params']:,} | {r['peer_trainable_params']:,} | "
            f"{r['molre_slices_per_s_at_limit']:,.0f} |"
        )
    return _table(f"**FLOPs per slice-step** (forward + backward, counted by FlopCounterMode on the meta device; "
                  f"step-rate bound at {limit:.0f} TFLOP/s; `blocks` = MoLRE in the attention linears, routed once "
                  "per slice (`adapter.molre.route_by=slice`, the default) or per token)",
                  "| preset | input | molre GFLOP | peer GFLOP | LoRA GFLOP | blocks by slice GFLOP (vs LoRA) | "
                  f"blocks by token GFLOP (vs LoRA) | molre trainable | peer trainable | molre slices/s at "
                  f"{limit:.0f} TFLOP/s |", lines)  # fmt: skip


def _epoch_md(rows: list[dict]) -> list[str]:
    lines = []
    for r in _of(rows, "train_epoch"):
        worker = f"{r['worker_volumes_per_s']:.2f}" if "worker_volumes_per_s" in r else "-"
        worker_ratio = (f"{r['worker_over_step_augment'] * 100:.0f}%"
                        if "worker_over_step_augment" in r else "-")  # fmt: skip
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['workers']} x {r['cpus_per_worker']} | "
            f"{r['batch_per_worker']} | {r.get('train_volumes_per_epoch', '-')} | "
            f"{r.get('controller_poll_s', 2.0):g} | "
            f"{'yes' if r.get('train_cached') else 'no'} | {r['epoch_volumes_per_s']:.2f} | {worker} | "
            f"{r['step_volumes_per_s']:.2f} | {r['step_augment_volumes_per_s']:.2f} | "
            f"{r['epoch_over_step'] * 100:.0f}% | {r['epoch_over_step_augment'] * 100:.0f}% | {worker_ratio} | "
            f"{r['loadavg'][0]:.1f} |"
        )
    return _table("**Full Ray Train epoch vs the pure step** (volumes/s for the whole machine; epoch = steady-state "
                  "median over epochs >= 1, between the controller's report stamps; in-worker = the worker's own "
                  "train pass + validation; poll = Ray Train's controller poll interval, which bounds an epoch from "
                  "below)",
                  "| preset | input | workers x CPUs | batch/worker | train vol/epoch | poll s | train rows cached | epoch vol/s | "
                  "in-worker vol/s | pure step vol/s | step + augment vol/s | epoch / step | epoch / (step + augment) "
                  "| in-worker / (step + augment) | load 1m |", lines)  # fmt: skip


def _blocks_md(rows: list[dict]) -> list[str]:
    lines = []
    for r in _of(rows, "blocks_overhead"):
        if "slice_step_ms" not in r:  # a row written before routing by slice existed
            continue
        cells = " | ".join(
            f"{r[f'{k}_step_ms']:.1f} | {r[f'{k}_overhead_pct']:+.1f}% ({r[f'{k}_overhead_pct_from_min']:+.1f}%; "
            f"{r[f'{k}_overhead_pct_from_cpu']:+.1f}%) | {r[f'{k}_flop_overhead_pct']:+.1f}%"
            for k in ("slice", "token")
        )
        lines.append(f"| {r['preset']} | {r['input']} | {r['mode']} | {r['lora_step_ms']:.1f} | {cells} | "
                     f"{r['loadavg'][0]:.1f} |")  # fmt: skip
    return _table("**MoLRE `blocks` placement vs LoRA** (`adapter.molre.placement=blocks`, routed once per slice "
                  "(`route_by=slice`, the default) or per token, vs `adapter.kind=none`; median wall step; overhead "
                  "also from the fastest steps and from CPU time per step; counted = FLOPs per slice-step)",
                  "| preset | input | mode | LoRA step ms | by slice: step ms | overhead (fastest; CPU time) | counted "
                  "| by token: step ms | overhead (fastest; CPU time) | counted | load 1m |", lines)  # fmt: skip


def _augment_md(rows: list[dict]) -> list[str]:
    lines = [
        f"| {'x'.join(map(str, r['shape']))} | {r['batch']} | {r['device']} | "
        f"{r['molre_ms_per_volume']:.3g} | {r['monai_cpu_ms_per_volume']:.1f} | "
        f"{r['monai_over_molre']:.1f}x | {r['loadavg'][0]:.1f} |"
        for r in _of(rows, "augment")
    ]
    return _table("**Augmentation per volume** (molre `augment_batch` from int16 on the device vs MONAI per volume "
                  "on CPU; bench/augment_bench.py)",
                  "| volume (D,H,W) | batch | molre device | molre ms/volume | MONAI CPU ms/volume | MONAI / molre "
                  "| load 1m |", lines)  # fmt: skip


def _features_md(rows: list[dict]) -> list[str]:
    lines = [
        f"| {r['preset']} | {r['input']} | {r['epochs']} | {r['cache_build_s']:.1f} | "
        f"{r['cached_trial_s']:.2f} | {r['e2e_trial_s']:.1f} | {r['e2e_over_cached']:.0f}x | "
        f"{r['loadavg'][0]:.1f} |"
        for r in _of(rows, "features")
    ]
    return _table("**Cached-feature trial vs the end-to-end trial** (frozen backbone; see the multi-fidelity "
                  "section)",
                  "| preset | input | epochs | feature cache build s | cached trial s | end-to-end trial s | "
                  "end-to-end / cached | load 1m |", lines)  # fmt: skip


# the tables of a suite's block, in this order (each renders nothing when its case has no rows)
CASE_TABLES = (_model_step_md, _flops_md, _epoch_md, _blocks_md, _augment_md, _features_md)


def update_markdown(path: Path, suite: str, block: str) -> None:
    """Replace this suite's block inside SECTION (creating the section or the block if absent)."""
    begin, end = f"<!-- bench/run.py {suite}: begin -->", f"<!-- bench/run.py {suite}: end -->"
    text = path.read_text() if path.exists() else "# molre benchmarks\n"
    marked = f"{begin}\n{block}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + marked + rest.split(end, 1)[1]
    elif SECTION in text:
        nxt = text.find("\n## ", text.index(SECTION) + len(SECTION))
        if nxt < 0:
            text = text.rstrip() + "\n\n" + marked + "\n"
        else:
            text = text[:nxt].rstrip() + "\n\n" + marked + "\n\n" + text[nxt + 1 :]
    else:
        text = text.rstrip() + f"\n\n{SECTION}\n\n{marked}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["cpu", "gpu"], required=True)
    ap.add_argument("--quick", action="store_true", help="toy sizes (no BENCHMARKS.md update unless --write)")
    ap.add_argument("--device", help="default: cuda for the gpu suite, cpu for the cpu suite")
    ap.add_argument(
        "--cases", type=lambda s: [c for c in s.split(",") if c], help=f"subset of {','.join(CASES)}"
    )
    ap.add_argument(
        "--shape", type=parse_shape, action="append", help="model_step / flops shape preset=VxS[@side]"
    )
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument(
        "--modes", type=lambda s: [m for m in s.split(",") if m], help="subset of eager,compiled,regional"
    )
    ap.add_argument(
        "--compile-mode",
        help="torch.compile mode of the compiled/regional step variants (e.g. max-autotune-no-cudagraphs)",
    )
    ap.add_argument(
        "--fp8", action="store_true", help="model_step: add molre-fp8 (on by default on the gpu suite)"
    )
    ap.add_argument("--epoch-train", type=int, help="train_epoch: training volumes per epoch")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: ensure_ray's)")
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--results", type=Path, help="suite results JSON (default: bench/results/<suite>.json)")
    ap.add_argument("--write", action="store_true", help="update --md even with --quick")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--merge", type=Path, nargs="+", metavar="FILE",
        help="fold these per-stage results files (bench/gpu_session.sh) into --results and rewrite --md; runs nothing",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.merge:
        results_path = args.results or args.md.parent / "bench" / "results" / f"{args.suite}.json"
        update_markdown(
            args.md, args.suite, render_block(args.suite, merge_stage_files(results_path, args.merge))
        )
        return 0
    for mode in args.modes or ():
        if mode not in MODES:
            ap.error(f"unknown mode {mode!r}; expected some of {','.join(MODES)}")
    for case in args.cases or ():
        if case not in CASES:
            ap.error(f"unknown case {case!r}; expected some of {','.join(CASES)}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_suite(args)
    if (args.write or not args.quick) and not args.no_write:
        argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        results_path = args.results or args.md.parent / "bench" / "results" / f"{args.suite}.json"
        results = merge_results(results_path, rows, f"python bench/run.py {argv_text}", bool(args.shape))
        update_markdown(args.md, args.suite, render_block(args.suite, results))
    return 1 if any("error" in r for r in rows) else 0


def merge_results(path: Path, rows: list[dict], command: str, keep_shapes: bool = False) -> dict[str, dict]:
    """Replace the cases this run measured in the suite's results file (other cases are kept); returns all.

    ``keep_shapes`` (a run given ``--shape``): a case keeps its rows of the shapes this run did not measure, so
    the GPU suite's model_step can be run one shape per call.
    """
    results = json.loads(path.read_text()) if path.exists() else {}
    info = next(r for r in rows if r["case"] == "machine")
    for case in CASES:
        mine, cmd = [r for r in rows if _case_of(r) == case], command
        if mine:
            if keep_shapes and case in results:
                shapes = {(r.get("preset"), r.get("input")) for r in mine}
                kept = [r for r in results[case]["rows"]
                        if "error" not in r and (r.get("preset"), r.get("input")) not in shapes]  # fmt: skip
                if kept:
                    mine = kept + mine
                    cmd = "; ".join(dict.fromkeys([*results[case]["command"].split("; "), command]))
            results[case] = {"rows": mine, "command": cmd, "date": datetime.date.today().isoformat(),
                             "machine": info}  # fmt: skip
    write_json(path, results)
    return results


def merge_stage_files(path: Path, files: list[Path]) -> dict[str, dict]:
    """Fold per-stage results files (``bench/gpu_session.sh`` writes one per stage) into the suite's ``path``.

    A case measured by several stages keeps the rows of all of them (one model_step shape per stage, say); a row
    equal to one already kept except for its load average is dropped; a case the stages measured replaces the
    suite's. The stages' own ``--results`` / ``--md`` are cut from the recorded commands.
    """
    results = json.loads(path.read_text()) if path.exists() else {}
    merged: dict[str, dict] = {}
    for file in files:
        for case, entry in json.loads(file.read_text()).items():
            command = re.sub(r" --(results|md) \S+", "", entry["command"])
            if case not in merged:
                merged[case] = {**entry, "rows": [], "command": command}
            kept = merged[case]
            seen = {_row_key(r) for r in kept["rows"]}
            for row in entry["rows"]:
                if _row_key(row) not in seen:
                    seen.add(_row_key(row))
                    kept["rows"].append(row)
            kept["command"] = "; ".join(dict.fromkeys([*kept["command"].split("; "), command]))
    results.update(merged)
    write_json(path, results)
    return results


def _row_key(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "loadavg"}, sort_keys=True)


def _case_of(row: dict) -> str | None:
    """The suite case a JSON row belongs to."""
    name = row["case"]
    return {"model_step_ratio": "model_step", "blocks_step": "blocks", "blocks_overhead": "blocks"}.get(
        name, name if name in CASES else None
    )


if __name__ == "__main__":
    sys.exit(main())
