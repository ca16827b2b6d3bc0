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

Results are merged into ``bench/results/<suite>.json`` after every case (and every model_step / blocks shape),
so a run killed by a time limit keeps what it finished. A row replaces the stored rows of its own key (preset,
input and variant for the step cases; see ``ROW_KEYS``); a run restricted by ``--shape``, ``--modes``,
``--no-compile``, ``--no-fp8``, ``--no-ablations`` or ``--no-peer-plus`` keeps the stored rows of the other keys, an unrestricted
run replaces its cases' rows (rows from another machine or torch are never mixed with new ones). The ratio rows
(``model_step_ratio``, ``blocks_overhead``) are recomputed from the merged step rows. ``--deadline`` (a
``date +%s`` value; bench/gpu_session.sh passes its stage's limit) makes the step cases skip a variant, and the
suite a case, that would not finish before it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import sys
import time
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
    peer_plus: bool = True  # model_step: also peer+ (the peer with molre's bf16 frozen weights, fused AdamW)


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
            ablations=True,
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
    """The command line's --shape, --no-compile / --modes, --fp8 / --no-fp8, --no-ablations, --no-peer-plus,
    --epoch-train and --features-train over a suite's sizes."""
    if args.shape:  # the model_step and blocks shapes (and the flops case's)
        suite.steps = args.shape
        suite.blocks = args.shape
    if args.no_compile:
        suite.modes = ("eager",)
    elif args.modes:
        suite.modes = tuple(args.modes)
    if getattr(args, "fp8", False):
        suite.fp8 = True
    if getattr(args, "no_fp8", False):
        suite.fp8 = False
    if getattr(args, "no_ablations", False):
        suite.ablations = False
    if getattr(args, "no_peer_plus", False):
        suite.peer_plus = False
    if args.epoch_train:
        suite.epoch["counts"] = {**suite.epoch["counts"], "train": args.epoch_train}
    if getattr(args, "features_train", None):
        suite.features["counts"] = {**suite.features["counts"], "train": args.features_train}
    return suite


def restricted(args) -> bool:
    """Whether a run measured only part of its cases' variants (its rows then leave the others' rows stored)."""
    return bool(args.shape or args.modes or args.no_compile or getattr(args, "no_fp8", False)
                or getattr(args, "no_ablations", False) or getattr(args, "no_peer_plus", False))  # fmt: skip


MIN_CASE_S = 20.0  # with a --deadline: a case is not started with less time than this left


def run_suite(args, save=None) -> list[dict]:
    """Run the suite's cases; ``save(rows)`` (optional) after every case and every step shape."""
    device = torch.device(args.device or ("cuda" if args.suite == "gpu" else "cpu"))
    suite = apply_options(suite_config(args.suite, args.quick), args)
    common = {"suite": args.suite + ("-quick" if args.quick else "")}
    if args.compile_mode:
        common["compile_mode"] = args.compile_mode
    deadline = getattr(args, "deadline", None)
    rows = [
        emit({"case": "machine", "device": str(device), **machine(device), "loadavg": loadavg(), **common})
    ]
    wanted = args.cases or CASES
    for case in wanted:
        if deadline is not None and deadline - time.time() < MIN_CASE_S:
            rows.append(emit({"case": case, "error": f"skipped: {deadline - time.time():.0f} s left before the "
                              "stage's time limit", "loadavg": loadavg(), **common}))  # fmt: skip
            continue
        try:
            for part in run_case(case, suite, device, args, common):
                rows += part
                if save is not None:
                    save(rows)
        except Exception as err:  # keep going: one broken case must not hide the others' figures
            traceback.print_exc(file=sys.stderr)
            rows.append(
                emit({"case": case, "error": f"{type(err).__name__}: {err}", "loadavg": loadavg(), **common})
            )
            if save is not None:
                save(rows)
    return rows


def run_case(case: str, suite: Suite, device: torch.device, args, common: dict):
    """Yields the case's rows: one list per step shape (model_step, blocks), else one list."""
    timing = {"rounds": suite.rounds, "repeats": suite.repeats, "warmup": suite.warmup, "common": common,
              "deadline": getattr(args, "deadline", None)}  # fmt: skip
    if "compile_mode" in common:  # torch.compile's mode for the compiled / regional variants
        timing["compile_kwargs"] = {"mode": common["compile_mode"]}
    if case == "flops":  # counted on the meta device: the GPU shapes' FLOPs on any machine
        from model_step import flops_case

        shapes = args.shape or list(dict.fromkeys(suite_config("gpu", quick=False).steps + suite.steps))
        yield flops_case(shapes, common=common)
    elif case == "model_step":
        from model_step import model_step_case

        for s in suite.steps:
            yield model_step_case(s, device, modes=suite.modes, ablations=suite.ablations, fp8=suite.fp8,
                                  peer_plus=suite.peer_plus, **timing)  # fmt: skip
    elif case == "blocks":
        from model_step import blocks_overhead_case

        for s in suite.blocks:
            yield blocks_overhead_case(s, device, modes=suite.modes, **timing)
    elif case == "train_epoch":
        from train_epoch import train_epoch_case

        yield train_epoch_case(device=device, num_cpus=args.num_cpus, common=common, **suite.epoch)
    elif case == "augment":
        from augment_case import augment_case

        yield augment_case(device, common=common, **suite.augment)
    elif case == "features":
        from features_case import features_case

        yield features_case(device=device, num_cpus=args.num_cpus, common=common, **suite.features)
    else:
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
    for r in (r for r in everything if "error" in r):
        if "impl" in r:
            out.append(f"Variant `{r['impl']}` / `{r['mode']}` of {r['preset']} {r['input']} ({r['case']}) "
                       f"failed: `{r['error']}`.")  # fmt: skip
        else:
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


def _num(value, fmt: str = ".2f", suffix: str = "") -> str:
    """A table cell: ``value`` formatted, or ``-`` when there is none."""
    return "-" if value is None else f"{value:{fmt}}{suffix}"


def _gflop_cell(r: dict) -> str:
    """Model GFLOP per slice-step; rows counted on the device (before the meta basis) say so."""
    cell = _num(r.get("gflop_per_slice_step"), ".4g")
    return cell if r.get("flop_basis") == "meta" or cell == "-" else f"{cell} (on-device count)"


def _model_step_md(rows: list[dict]) -> list[str]:
    steps, ratios = _of(rows, "model_step"), _of(rows, "model_step_ratio")
    if not steps:
        return []
    lines = []
    for r in steps:
        achieved = "-" if r.get("achieved_gflops") is None else _si(r["achieved_gflops"] * 1e9, "FLOP/s")
        if r.get("achieved_vs_bf16_peak") is False:
            achieved += "*"
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['impl']} | {r['mode']} | {r['slices_per_s']:.1f} | "
            f"{r['step_ms']:.1f} ({r['step_ms_min']:.1f}) / {r['cpu_ms_per_step']:.1f} | {_gflop_cell(r)} | "
            f"{achieved} | {r['peak_mem_mib']:.0f} MiB ({r['mem_method']}) | {r['loadavg'][0]:.1f} |"
        )
    out = _table("**Model step** (forward + backward + AdamW). Step ms: median wall (fastest) / process CPU ms "
                 "(all threads); slices/s and achieved FLOP/s from the median wall step. GFLOP = model FLOPs per "
                 "slice-step on one basis throughout: counted by FlopCounterMode on the meta device (the FLOPs "
                 "table's count; forward + backward, no attention recompute), each variant given its "
                 "implementation's count (`peer+` the peer's; `molre-fp8` and the ablations molre's). `*` = "
                 "`molre-fp8`: molre's FLOPs (the unpadded problem) over a step whose frozen products run on FP8 "
                 "tensor cores: not comparable with a bf16 peak. `peer` = the issue's peer (timm + peft LoRA, fp32 "
                 "frozen weights under bf16 autocast, torch's default foreach AdamW); `peer+` = the same peer with "
                 "molre's bf16 frozen weights and fused AdamW (GPU; left out of an fp32 CPU run, where it is the "
                 "peer).",
                 "| preset | input (B x S x side^2) | impl | mode | slices/s | step ms | GFLOP / slice-step "
                 "(model, meta count) | achieved FLOP/s | peak memory | load 1m |", lines)  # fmt: skip
    return out[:-1] + _ratios_md(ratios) + _fp8_md(ratios) + _ablations_md(ratios) + [""]


def _ratio_cell(r: dict, key: str, digits: int = 2) -> str:
    if key not in r:
        return "-"
    return (f"{r[key]:.{digits}f}x ({r[key + '_from_min']:.{digits}f}x; "
            f"{r[key + '_from_cpu']:.{digits}f}x)")  # fmt: skip


def _modes_of(ratios: list[dict], prefix: str) -> list[str]:
    return [m for m in MODES if any(f"{prefix}_{m}" in r for r in ratios)]


def _ratios_md(ratios: list[dict]) -> list[str]:
    """molre / peer and molre / peer+ per compile mode (the sub-table of the model step)."""
    modes = _modes_of(ratios, "molre_over_peer") or _modes_of(ratios, "molre_over_peerplus")
    lines = []
    for r in ratios:
        for against, key in (("peer", "molre_over_peer"), ("peer+", "molre_over_peerplus")):
            if not any(f"{key}_{m}" in r for m in modes):
                continue
            best = r.get(f"best_molre_over_best_{key.removeprefix('molre_over_')}")
            cells = " | ".join(_ratio_cell(r, f"{key}_{m}") for m in modes)
            lines.append(f"| {r['preset']} | {r['input']} | {against} | {cells} | {_num(best, '.2f', 'x')} |")
    header = ("| preset | input | molre over | " + " | ".join(modes)
              + " | best molre mode / best mode of the other (median wall) |")  # fmt: skip
    return _subtable("molre / peer (the issue's peer) and molre / peer+ (the peer with molre's bf16 frozen weights "
                     "and fused AdamW) throughput, per mode: from the median wall steps (from the fastest steps; "
                     "from CPU time per step):", header, lines)  # fmt: skip


def _fp8_md(ratios: list[dict]) -> list[str]:
    """molre-fp8 over molre and over the peer, per mode (the sub-table of the model step)."""
    modes = _modes_of(ratios, "fp8_over_molre") or _modes_of(ratios, "fp8_over_peer")
    lines = [
        f"| {r['preset']} | {r['input']} | "
        + " | ".join(_ratio_cell(r, f"fp8_over_molre_{m}") for m in modes)
        + " | "
        + " | ".join(_ratio_cell(r, f"fp8_over_peer_{m}") for m in modes)
        + f" | {_num(r.get('best_fp8_over_best_peer'), '.2f', 'x')} |"
        for r in ratios
        if any(f"fp8_over_{k}_{m}" in r for k in ("molre", "peer") for m in modes)
    ]
    header = ("| preset | input | " + " | ".join(f"fp8 / molre, {m}" for m in modes) + " | "
              + " | ".join(f"fp8 / peer, {m}" for m in modes) + " | best fp8 / best peer (median wall) |")  # fmt: skip
    return _subtable("FP8 frozen matmuls (`molre-fp8` = molre with `train.frozen_matmul=fp8`) over molre and over "
                     "the peer, from the median wall steps (from the fastest steps; from CPU time per step):",
                     header, lines)  # fmt: skip


def _ablations_md(ratios: list[dict]) -> list[str]:
    """What each fast path gives (the sub-table of the model step)."""
    lines = [
        f"| {r['preset']} | {r['input']} | {key.removeprefix('speedup_vs_')} | {_ratio_cell(r, key, 3)} |"
        for r in ratios
        for key in [k for k in r if k.startswith("speedup_vs_") and not k.endswith(("_min", "_cpu"))]
    ]
    return _subtable("What each fast path gives: molre eager (the device's defaults) / molre eager with one "
                         "setting changed, from the median wall step (the fastest step; CPU time per step); > 1 = "
                         "the default is faster. `fp32-frozen` = frozen weights kept fp32 and re-cast by bf16 "
                         "autocast every step (GPU); `foreach-adamw` / `fused-adamw` = the other AdamW than the "
                         "device's default (fused on CUDA, foreach on CPU); `recompute` = activation "
                         "checkpointing on (what it costs; what it saves is its peak memory in the step table). "
                         "Measured only when the run has eager.",
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
    return _table(f"**FLOPs per slice-step** (model FLOPs, forward + backward, counted by FlopCounterMode on the "
                  f"meta device: the basis of every GFLOP and achieved FLOP/s figure in this block; step-rate bound "
                  f"at {limit:.0f} TFLOP/s; `blocks` = MoLRE in the attention linears, routed once per slice "
                  "(`adapter.molre.route_by=slice`, the default) or per token)",
                  "| preset | input | molre GFLOP | peer GFLOP | LoRA GFLOP | blocks by slice GFLOP (vs LoRA) | "
                  f"blocks by token GFLOP (vs LoRA) | molre trainable | peer trainable | molre slices/s at "
                  f"{limit:.0f} TFLOP/s |", lines)  # fmt: skip


def _epoch_md(rows: list[dict]) -> list[str]:
    lines = []
    for r in _of(rows, "train_epoch"):
        steps = f" ({r['train_steps_per_epoch']})" if r.get("train_steps_per_epoch") else ""
        train, ratio = _num(r.get("train_volumes_per_s")), _num(_pct(r.get("train_over_step")), ".0f", "%")
        if "train_volumes_per_s" not in r and r.get("worker_volumes_per_s"):  # a row from before time/train_s
            train = f">= {r['worker_volumes_per_s']:.2f} (train + val)"  # was recorded: a lower bound
            ratio = f">= {r['worker_volumes_per_s'] / r['step_volumes_per_s'] * 100:.0f}%"
        fixed = (f"{r['epoch_fixed_s']:.2f} ({_num(r.get('val_s'))} / {_num(r.get('epoch_rest_s'))})"
                 if r.get("epoch_fixed_s") is not None else "-")  # fmt: skip
        lines.append(
            f"| {r['preset']} | {r['input']} | {r['workers']} x {r['cpus_per_worker']} | "
            f"{r['batch_per_worker']} | {r.get('train_volumes_per_epoch', '-')}{steps} | "
            f"{r.get('controller_poll_s', 2.0):g} | {'yes' if r.get('train_cached') else 'no'} | "
            f"{train} | {r['step_volumes_per_s']:.2f} | {r['step_augment_volumes_per_s']:.2f} | **{ratio}** | "
            f"{_num(_pct(r.get('train_over_step_augment')), '.0f', '%')} | {fixed} | "
            f"{r['epoch_volumes_per_s']:.2f} | {r['epoch_over_step'] * 100:.0f}% | {r['loadavg'][0]:.1f} |"
        )
    return _table("**Full Ray Train epoch vs the pure step** (volumes/s for the whole machine, medians over epochs "
                  ">= 1). `train pass` = the worker's own train pass: the epoch's train volumes over the loop's "
                  "`time/train_s`, measured on the worker (RFS batching, host-to-device copy, windowing + "
                  "augmentation, the steps, DDP); **the >= 90 % target is judged on `train pass / step`**: it is "
                  "the per-step cost of the data path and the loop against the bare step, and it does not depend "
                  "on the epoch's length. `fixed s per epoch` = wall epoch - train pass: validation (the loop's "
                  "`time/val_s`) / the rest (checkpoint, report and its hand-over to the controller, +- the "
                  "controller's poll, which stamps each report up to one poll late); it does not shrink with the "
                  "step and is amortised by the epoch's length (E train volumes: wall epoch vol/s = E / (E / "
                  "train pass vol/s + fixed s)). `wall epoch` = interval between the controller's report stamps, "
                  "kept for reference: at these toy epoch lengths it is mostly the fixed cost. Rows recorded "
                  "before the stamps kept `time/train_s` apart give the worker's train pass + validation: a lower "
                  "bound (`>=`) of the train pass.",
                  "| preset | input | workers x CPUs | batch/worker | train vol (steps) / epoch | poll s | train rows "
                  "cached | train pass vol/s | pure step vol/s | step + augment vol/s | train pass / step | train "
                  "pass / (step + augment) | fixed s per epoch (val / rest) | wall epoch vol/s | wall epoch / step "
                  "| load 1m |", lines)  # fmt: skip


def _pct(value):
    return None if value is None else value * 100


def _blocks_md(rows: list[dict]) -> list[str]:
    lines = []
    for r in _of(rows, "blocks_overhead"):
        cells = " | ".join(
            f"{r[f'{k}_step_ms']:.1f} | {r[f'{k}_overhead_pct']:+.1f}% ({r[f'{k}_overhead_pct_from_min']:+.1f}%; "
            f"{r[f'{k}_overhead_pct_from_cpu']:+.1f}%) | {_num(r.get(f'{k}_flop_overhead_pct'), '+.1f', '%')}"
            if f"{k}_step_ms" in r
            else "- | - | -"
            for k in ("slice", "token")
        )
        lines.append(f"| {r['preset']} | {r['input']} | {r['mode']} | {r['lora_step_ms']:.1f} | {cells} | "
                     f"{r['loadavg'][0]:.1f} |")  # fmt: skip
    return _table("**MoLRE `blocks` placement vs LoRA** (`adapter.molre.placement=blocks`, routed once per slice "
                  "(`route_by=slice`, the default) or per token, vs `adapter.kind=none`; median wall step; overhead "
                  "also from the fastest steps and from CPU time per step; counted = model FLOPs per slice-step)",
                  "| preset | input | mode | LoRA step ms | by slice: step ms | overhead (fastest; CPU time) | counted "
                  "| by token: step ms | overhead (fastest; CPU time) | counted | load 1m |", lines)  # fmt: skip


def _augment_md(rows: list[dict]) -> list[str]:
    lines = [
        f"| {'x'.join(map(str, r['shape']))} | {r['batch']} | {r['device']} | "
        f"{r['molre_ms_per_volume']:.3g} | {_num(r.get('molre_warp_only_ms_per_volume'), '.3g')} | "
        f"{_num(r.get('molre_fullres_warp_ms_per_volume'), '.3g')} | {r['monai_cpu_ms_per_volume']:.1f} | "
        f"{r['monai_over_molre']:.1f}x | {_num(r.get('monai_over_molre_fullres'), '.1f', 'x')} | "
        f"{r['loadavg'][0]:.1f} |"
        for r in _of(rows, "augment")
    ]
    return _table("**Augmentation per volume** (ms per volume; molre on the device vs MONAI per volume on CPU; "
                  "bench/augment_bench.py). `augment_batch` = from int16 HU, windowing included, the elastic field "
                  "smoothed on a 3x coarser grid (molre's default); `warp only` = `VolumeAugmenter` on windowed "
                  "volumes, with that coarse field and with the field smoothed at full resolution "
                  "(`elastic_coarse=1`, MONAI's own cost model)",
                  "| volume (D,H,W) | batch | molre device | molre augment_batch | warp only, 3x-coarse field | "
                  "warp only, full-res field | MONAI CPU | MONAI / augment_batch | MONAI / full-res warp | load 1m |",
                  lines)  # fmt: skip


def _features_md(rows: list[dict]) -> list[str]:
    lines = []
    for r in _of(rows, "features"):
        epochs = r.get("epochs_run", r["epochs"])
        fixed = r.get("e2e_fixed_s", r["e2e_trial_s"] - epochs * r["e2e_epoch_s"])
        e2e_vols = r.get("e2e_train_volumes_per_epoch")
        volumes = f"{r['train_volumes']} / {r['val_volumes']}" + (f" ({e2e_vols} RFS)" if e2e_vols else "")
        lines.append(
            f"| {r['preset']} | {r['input']} | {volumes} | {epochs} | {r['cache_build_s']:.1f} | "
            f"{r['cached_trial_s']:.2f} | {r['e2e_trial_s']:.1f} | {r['e2e_over_cached']:.0f}x | "
            f"{r['cached_epoch_s']:.3f}{'' if 'cached_fixed_s' in r else ' (mean)'} | {r['e2e_epoch_s']:.3f} | "
            f"**{r['e2e_epoch_over_cached_epoch']:.1f}x** | "
            f"{fixed:.1f} | {r['loadavg'][0]:.1f} |"
        )
    return _table("**Cached-feature trial vs the end-to-end trial** (frozen backbone; see the multi-fidelity "
                  "section). Per trial = the whole end-to-end trial (prepare + TorchTrainer.fit on a running "
                  "Ray: worker start, CUDA init, epoch 0's compile and first read, then the epochs) over the "
                  "cached trial (an in-process call on the built cache, without Tune's own per-trial cost); it is "
                  "mostly the end-to-end side's fixed start-up (`e2e fixed s` = trial - epochs x steady epoch), "
                  "so it shrinks as trials get longer. Per epoch = steady end-to-end epoch (between report stamps, "
                  "validation included) over the cached trial's epoch: the part that grows with the epoch's "
                  "length (`(mean)`: a row from before the cached epochs were timed apart, its trial / epochs). "
                  "Both depend on the trial's length (train / val volumes, epochs), given in each row.",
                  "| preset | input | train / val volumes | epochs | feature cache build s | cached trial s | "
                  "end-to-end trial s | per trial: e2e / cached | cached epoch s | e2e epoch s | per epoch: e2e / "
                  "cached | e2e fixed s | load 1m |", lines)  # fmt: skip


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
        "--shape",
        type=parse_shape,
        action="append",
        help="model_step / blocks / flops shape preset=VxS[@side]",
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
    ap.add_argument("--no-fp8", action="store_true", help="model_step: leave molre-fp8 out")
    ap.add_argument(
        "--no-ablations", action="store_true", help="model_step: leave the ablations out (gpu/cpu suites: on)"
    )
    ap.add_argument("--no-peer-plus", action="store_true", help="model_step: leave peer+ out")
    ap.add_argument("--epoch-train", type=int, help="train_epoch: training volumes per epoch")
    ap.add_argument("--features-train", type=int, help="features: training volumes per epoch")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--num-cpus", type=int, help="logical CPUs of a local Ray (default: ensure_ray's)")
    ap.add_argument(
        "--deadline", type=float,
        help="time.time() (`date +%%s`) by which the run must end: variants and cases that would not finish "
             "are skipped with an error row (bench/gpu_session.sh passes its stage's limit)",
    )  # fmt: skip
    ap.add_argument("--md", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--results", type=Path, help="suite results JSON (default: bench/results/<suite>.json)")
    ap.add_argument("--write", action="store_true", help="update --md even with --quick")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--render", action="store_true", help="rewrite --md's suite block from --results; runs nothing"
    )
    ap.add_argument(
        "--merge", type=Path, nargs="+", metavar="FILE",
        help="fold these per-stage results files (bench/gpu_session.sh) into --results and rewrite --md; runs nothing",
    )  # fmt: skip
    args = ap.parse_args(argv)
    results_path = args.results or args.md.parent / "bench" / "results" / f"{args.suite}.json"
    if args.render:
        results = json.loads(results_path.read_text())
        update_markdown(args.md, args.suite, render_block(args.suite, results))
        return 0
    if args.merge:
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
    if args.fp8 and args.no_fp8:
        ap.error("--fp8 and --no-fp8 together")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.threads:
        torch.set_num_threads(args.threads)
    save = None
    if (args.write or not args.quick) and not args.no_write:
        argv_text = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        command = re.sub(r" --deadline \S+", "", f"python bench/run.py {argv_text}")

        def save(rows: list[dict], final: bool = False) -> None:
            # until the run ends, stored rows of keys it has not measured yet stay (a killed run loses nothing)
            results = merge_results(results_path, rows, command, keep_other=restricted(args) or not final)
            update_markdown(args.md, args.suite, render_block(args.suite, results))

    rows = run_suite(args, save)
    if save is not None:
        save(rows, final=True)
    return 1 if any("error" in r for r in rows) else 0


# ---- results files -------------------------------------------------------------------------------------------

# the fields that identify a row: a new row replaces the stored rows with the same key, the others are kept
ROW_KEYS = {
    "model_step": ("preset", "input", "impl", "mode"),
    "blocks_step": ("preset", "input", "impl", "mode"),
    "flops": ("preset", "input"),
    "train_epoch": ("preset", "input", "workers", "controller_poll_s", "train_volumes_per_epoch"),
    "augment": ("shape", "batch", "device"),
    "features": ("preset", "input", "train_volumes", "val_volumes", "epochs"),
}
# rows computed from other rows of their case (recomputed after every merge)
DERIVED = {"model_step_ratio": "model_step", "blocks_overhead": "blocks_step"}
MACHINE_KEYS = ("gpu", "cpu", "cores", "torch")


def _row_id(row: dict) -> str:
    fields = ROW_KEYS.get(row["case"])
    if fields is None:
        return _row_fingerprint(row)
    return json.dumps([row["case"], *[row.get(f) for f in fields]])


def _row_fingerprint(row: dict) -> str:
    return json.dumps({k: v for k, v in row.items() if k != "loadavg"}, sort_keys=True)


def _derived(rows: list[dict]) -> list[dict]:
    from model_step import blocks_summaries, step_ratios

    return step_ratios(rows) + blocks_summaries(rows)


def _same_machine(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and all(a.get(k) == b.get(k) for k in MACHINE_KEYS)


def _merged_entry(old: dict | None, new_rows: list[dict], command: str, info: dict, date: str) -> dict:
    """A case's results entry: ``new_rows`` replace ``old``'s rows of the same keys (``_row_id``); ``old``'s rows
    of other keys are kept when it comes from the same machine and torch (not its error rows); the derived rows
    are recomputed. ``old=None``: the new rows alone."""
    new_rows = [r for r in new_rows if r["case"] not in DERIVED]
    kept, rows = False, []
    if old is not None and _same_machine(old.get("machine"), info):
        by_key: dict[str, list[dict]] = {}
        for r in new_rows:
            by_key.setdefault(_row_id(r), []).append(r)
        for r in old["rows"]:  # a replaced row's place goes to its replacements
            if r["case"] in DERIVED:
                continue
            key = _row_id(r)
            if key in by_key:
                rows += by_key.pop(key)
            elif "error" not in r:
                rows.append(r)
                kept = True
        new_rows = [r for group in by_key.values() for r in group]
    rows += new_rows
    order = {g: i for i, g in enumerate(dict.fromkeys((r.get("preset"), r.get("input")) for r in rows))}
    rows.sort(key=lambda r: order[r.get("preset"), r.get("input")])  # stable: a shape's rows stay together
    if kept:
        command = "; ".join(dict.fromkeys([*old["command"].split("; "), *command.split("; ")]))
        first = str(old.get("date", date)).split("..")[0]
        date = date if first >= date else f"{first}..{date}"
    return {"rows": rows + _derived(rows), "command": command, "date": date, "machine": info}


def merge_results(path: Path, rows: list[dict], command: str, keep_other: bool = False) -> dict[str, dict]:
    """Merge one run's rows into the suite's results file, case by case (cases it did not run are kept);
    returns all.

    ``keep_other`` (a restricted run, or a save before the run has ended): a case keeps its stored rows of the
    keys this run did not measure; else the run's rows replace the case's, unless all of them are errors.
    """
    results = json.loads(path.read_text()) if path.exists() else {}
    info = next(r for r in rows if r["case"] == "machine")
    today = datetime.date.today().isoformat()
    for case in CASES:
        mine = [r for r in rows if _case_of(r) == case]
        if mine:
            keep = keep_other or all("error" in r for r in mine)
            results[case] = _merged_entry(results.get(case) if keep else None, mine, command, info, today)
    write_json(path, results)
    return results


def merge_stage_files(path: Path, files: list[Path]) -> dict[str, dict]:
    """Fold per-stage results files (``bench/gpu_session.sh`` writes one per stage) into the suite's ``path``.

    The stages' rows of a case are pooled (a row equal to one already pooled except for its load average is
    dropped), then merged as a restricted run's are: they replace the stored rows of their keys (preset, input
    and variant for the step cases, ``ROW_KEYS``) and the stored rows of other keys stay, so a stage of one mode
    of one shape leaves every other row in place. The stages' own ``--results`` / ``--md`` are cut from the
    recorded commands.
    """
    results = json.loads(path.read_text()) if path.exists() else {}
    pooled: dict[str, dict] = {}
    for file in files:
        for case, entry in json.loads(file.read_text()).items():
            command = re.sub(r" --(results|md) \S+", "", entry["command"])
            kept = pooled.setdefault(case, {"rows": [], "commands": [], "seen": set(), "machine": entry["machine"],
                                            "date": entry["date"]})  # fmt: skip
            for row in entry["rows"]:
                if row["case"] not in DERIVED and _row_fingerprint(row) not in kept["seen"]:
                    kept["seen"].add(_row_fingerprint(row))
                    kept["rows"].append(row)
            kept["commands"] += command.split("; ")
            kept["date"] = max(kept["date"], entry["date"])
    for case, kept in pooled.items():
        command = "; ".join(dict.fromkeys(kept["commands"]))
        results[case] = _merged_entry(results.get(case), kept["rows"], command, kept["machine"], kept["date"])
    write_json(path, results)
    return results


def _case_of(row: dict) -> str | None:
    """The suite case a JSON row belongs to."""
    name = row["case"]
    return {"model_step_ratio": "model_step", "blocks_step": "blocks", "blocks_overhead": "blocks"}.get(
        name, name if name in CASES else None
    )


if __name__ == "__main__":
    sys.exit(main())
