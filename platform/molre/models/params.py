"""`molre params`: the parameter table of Table 2 for the paper's setting, built on the meta device.

LoRA r=8 alpha=16 in the attention linears, MoLRE K=6 r=8 d_h=256 on the features; every preset at its
native size. Building on ``meta`` allocates no memory, so the 431M-parameter MedGemma tower costs nothing.
"""

from __future__ import annotations

import json

import torch

from molre.config import build_config
from molre.models.backbones import PAPER_PRESETS, PRESETS, get_preset
from molre.models.classifier import build_model


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
    rows = []
    for name in presets:
        with_molre, base = count_params(name, "molre"), count_params(name, "none")
        rows.append({
            "preset": name, "domain": get_preset(name).domain, "total": with_molre["total"],
            "trainable_base": base["trainable"], "trainable_molre": with_molre["trainable"],
            "molre": with_molre["molre"], "molre_share": with_molre["molre_share"],
        })  # fmt: skip
    return rows


def _m(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| preset | domain | total | trainable (base) | trainable (+MoLRE) | MoLRE | MoLRE share |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        molre = _m(r["molre"]) if r["molre"] else "-"
        share = f"{100 * r['molre_share']:.3f}%" if r["molre"] else "-"
        lines.append(f"| {r['preset']} | {r['domain']} | {_m(r['total'])} | {_m(r['trainable_base'])} | "
                     f"{_m(r['trainable_molre'])} | {molre} | {share} |")  # fmt: skip
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
