"""`molre params`: the parameter table of Table 2 for the paper's setting, built on the meta device.

LoRA r=8 alpha=16 in the attention linears, MoLRE K=6 r=8 d_h=256 on the features; every preset at its
native size. Building on ``meta`` allocates no memory, so the MedGemma tower (418.85M parameters as built here,
431.1M in the paper's Table 2) costs nothing.

The table prints the paper's Table 2 figures beside ours with the difference in %, so a stand-in's count
(pillar0-headct, deepcntd) is never read as the paper's. Our counts are shown to 0.001M; the paper prints totals
to 0.1M and rounds MoLRE counts UP to 0.01M (272,134 -> 0.28M), so a MoLRE difference of a few % is rounding.
"""

from __future__ import annotations

import json
import math

import torch

from molre.config import build_config
from molre.models.backbones import PAPER_PRESETS, PRESETS, get_preset
from molre.models.classifier import build_model

# The paper's Table 2 as printed: preset -> (total params, MoLRE params); None where it prints "-".
# Totals are given to 0.1M; MoLRE counts are rounded up to 0.01M.
PAPER_TABLE2: dict[str, tuple[int, int | None]] = {
    "dinov3-base": (86_600_000, 280_000),
    "dinov3-large": (305_200_000, 370_000),
    "medimageinsight": (364_300_000, 370_000),
    "medgemma": (431_100_000, 410_000),
    "pillar0-headct": (113_900_000, 410_000),
    "deepcntd": (6_900_000, None),
}

# Presets whose architecture is a stand-in for the paper's model (see backbones.py), not the model itself.
STAND_INS = ("pillar0-headct", "deepcntd")


def _diff(ours: int, paper: int | None) -> float | None:
    """``(ours - paper) / paper``, None without a paper figure."""
    return None if not paper else (ours - paper) / paper


def count_config_params(cfg) -> dict:
    """``{"total", "trainable", "molre", "molre_share"}`` of the model a run config builds (on meta)."""
    with torch.device("meta"):
        model = build_model(cfg, load_weights=False)
    total = sum(t.numel() for t in model.parameters())
    trainable = sum(t.numel() for t in model.parameters() if t.requires_grad)
    molre = sum(
        t.numel()
        for m in model.molre_modules()
        for n, t in m.named_parameters()
        if not n.startswith("base_layer.")
    )
    return {"total": total, "trainable": trainable, "molre": molre, "molre_share": molre / total}


def count_params(preset: str, adapter: str = "molre") -> dict:
    """``{"preset", "total", "trainable", "molre", "molre_share"}`` for the paper's setting of ``preset``."""
    kind = adapter if get_preset(preset).supports_molre else "none"
    cfg = build_config({"backbone": {"preset": preset}, "adapter": {"kind": kind}})
    return {"preset": preset, **count_config_params(cfg)}


def table_rows(presets=PAPER_PRESETS) -> list[dict]:
    """One row per preset: our counts, the paper's Table 2 figures (None if not in the paper) and the relative
    differences ``(ours - paper) / paper``."""
    rows = []
    for name in presets:
        with_molre, base = count_params(name, "molre"), count_params(name, "none")
        paper_total, paper_molre = PAPER_TABLE2.get(name, (None, None))
        rows.append({
            "preset": name, "domain": get_preset(name).domain, "total": with_molre["total"],
            "trainable_base": base["trainable"], "trainable_molre": with_molre["trainable"],
            "molre": with_molre["molre"], "molre_share": with_molre["molre_share"],
            "paper_total": paper_total, "total_diff": _diff(with_molre["total"], paper_total),
            "paper_molre": paper_molre,
            "molre_diff": _diff(with_molre["molre"], paper_molre) if with_molre["molre"] else None,
        })  # fmt: skip
    return rows


def _m(n: int, digits: int = 3) -> str:
    return f"{n / 1e6:.{digits}f}M"


def _ceil_m(n: int) -> str:
    """Rounded up to 0.01M, as the paper prints MoLRE counts."""
    return f"{math.ceil(n / 1e4) / 100:.2f}M"


def _pct(d: float | None) -> str:
    return "-" if d is None else f"{100 * d:+.1f}%"


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``table_rows`` plus notes on the paper's figures and rounding."""
    lines = [
        "| preset | domain | total | paper total | diff | trainable (base) | trainable (+MoLRE) | MoLRE | "
        "paper MoLRE | diff | MoLRE share |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        molre = _m(r["molre"]) if r["molre"] else "-"
        share = f"{100 * r['molre_share']:.3f}%" if r["molre"] else "-"
        paper_total = _m(r["paper_total"], 1) if r.get("paper_total") else "-"
        paper_molre = _m(r["paper_molre"], 2) if r.get("paper_molre") else "-"
        lines.append(f"| {r['preset']} | {r['domain']} | {_m(r['total'])} | {paper_total} | "
                     f"{_pct(r.get('total_diff'))} | {_m(r['trainable_base'])} | {_m(r['trainable_molre'])} | "
                     f"{molre} | {paper_molre} | {_pct(r.get('molre_diff'))} | {share} |")  # fmt: skip
    in_paper = [r for r in rows if r.get("paper_total")]
    if in_paper:
        lines += ["", "paper: Table 2 as printed (totals to 0.1M, MoLRE rounded UP to 0.01M); "
                      "diff = (ours - paper) / paper."]  # fmt: skip
        with_molre = [r for r in in_paper if r["molre"] and r.get("paper_molre")]
        if with_molre:
            ceil = ", ".join(f"{r['preset']} {_ceil_m(r['molre'])}" for r in with_molre)
            differ = [r["preset"] for r in with_molre if _ceil_m(r["molre"]) != _m(r["paper_molre"], 2)]
            verdict = f"differs from the paper for {', '.join(differ)}" if differ else "all as in the paper"
            lines.append(f"MoLRE rounded up to 0.01M like the paper: {ceil} ({verdict}).")
        off = [r["preset"] for r in in_paper if abs(r["total_diff"]) > 0.01]
        if off:
            stand_ins = [p for p in off if p in STAND_INS]
            note = f"; {' and '.join(stand_ins)}: stand-in architectures" if stand_ins else ""
            lines.append(f"Totals more than 1% off the paper ({', '.join(off)}): the model built here is not the "
                         f"paper's to the parameter{note}.")  # fmt: skip
    return "\n".join(lines)


def add_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--preset", choices=sorted(PRESETS), help="one preset (paper setting: LoRA + MoLRE)")
    group.add_argument("--all", action="store_true", help="Table-2 style table of the paper's six presets")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args) -> int:
    if args.preset:
        row = count_params(args.preset)
        print(json.dumps(row) if args.json else format_table(table_rows([args.preset])))
        return 0
    rows = table_rows()
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))
    return 0
