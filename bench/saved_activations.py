"""What activation checkpointing saves: the bytes autograd keeps for the backward, with and without it (any device).

    python bench/saved_activations.py                                   # deepcntd at 32 x 224^2, tiny presets
    python bench/saved_activations.py --preset deepcntd --input 16 64 64

One forward of one volume in fp32, each preset as a run trains it (its own fine-tuning: LoRA for the ViTs, the whole
net for the 3D DenseNet; MoLRE where the preset has attention) under ``torch.autograd.graph.saved_tensors_hooks``:
``packed`` sums the bytes of every tensor autograd packs (a tensor saved by two ops counts twice), ``unique`` counts
each storage once (what stays resident, parameters included). Checkpointed (``train.activation_checkpointing``,
``molre.models.runtime``) a recomputed block or dense layer keeps only its input, so the two columns show what the
switch removes; the peak of a backward adds the largest recomputed region on top, which this count does not see (a
GPU's ``max_memory_allocated`` does: ``bench/model_step.py``). The model and its weights are the same in both rows
(same seed), so only the kept activations differ. One JSON line per (preset, input)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from molre.config import build_config
from molre.models import build_model
from molre.models.runtime import prepare_runtime

MIB = 2**20
# (preset, [D, H, W]): deepcntd at 32 x 224^2 (a 3D CNN on the whole volume), 4 DINOv3-B slices, the test presets
DEFAULT_CASES = [
    ("deepcntd", (32, 224, 224)),
    ("dinov3-base", (4, 224, 224)),
    ("tiny-cnn3d", (8, 64, 64)),
    ("tiny-vit", (4, 64, 64)),
]


def kept_bytes(model: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Bytes autograd keeps for the backward of one forward of ``model`` on ``x``: packed and unique storages."""
    packed, storages = [0], {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        size = t.numel() * t.element_size()
        packed[0] += size
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = max(storages.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return {"packed": packed[0], "unique": sum(storages.values())}


def measure(preset: str, size: tuple[int, int, int]) -> dict:
    depth, height, width = size
    row = {"case": "saved_activations", "preset": preset, "input": [1, 3, *size], "dtype": "float32"}
    for recompute in (False, True):
        cfg = build_config({"backbone": {"preset": preset, "image_size": height},
                            "adapter": {"kind": "molre" if _attends(preset) else "none"}, "data": {"num_slices": depth},
                            "train": {"activation_checkpointing": recompute, "compile": "off"}})  # fmt: skip
        torch.manual_seed(0)
        model = build_model(cfg).train()
        done = prepare_runtime(model, cfg, "cpu")
        x = torch.rand(1, 3, depth, height, width)  # [B, 3 windows, S, H, W], 2D and 3D presets alike
        start = time.perf_counter()
        kept = kept_bytes(model, x)
        key = "checkpointed" if recompute else "plain"
        row[f"{key}_packed_mib"] = round(kept["packed"] / MIB, 1)
        row[f"{key}_unique_mib"] = round(kept["unique"] / MIB, 1)
        row[f"{key}_forward_s"] = round(time.perf_counter() - start, 2)
        if recompute:
            row["recomputed_regions"] = done["checkpointed_blocks"]
    row["unique_ratio"] = round(row["checkpointed_unique_mib"] / row["plain_unique_mib"], 3)
    return row


def _attends(preset: str) -> bool:
    """MoLRE needs attention (the paper's DeepCNTD row has none): the preset's own fine-tuning otherwise."""
    from molre.models.backbones import PRESETS

    return bool(PRESETS[preset].lora_targets)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", help="one preset (default: deepcntd, tiny-cnn3d, tiny-vit)")
    parser.add_argument(
        "--input", type=int, nargs=3, metavar=("D", "H", "W"), help="volume size with --preset"
    )
    args = parser.parse_args(argv)
    cases = [(args.preset, tuple(args.input or (8, 64, 64)))] if args.preset else DEFAULT_CASES
    for preset, size in cases:
        print(json.dumps(measure(preset, size)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
