"""`molre evaluate` and `molre predict`: score a checkpoint's best weights on a split, or on one series.

evaluate: per-finding AUCs (Parquet + Markdown), mean +- std and stratified counts, as ``summary.json``.
predict: the 75 probabilities, the routing weights of each slice and the attention weight of each slice.
Both run in-process on one device (no cluster needed) and read shards with pyarrow. The checkpoint, the data and
evaluate's output folder may each be a local path or an ``s3://`` URI (read and written through
``molre.data.storage``).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from molre.config import RunConfig
from molre.data import shards, storage
from molre.data.augment import augment_batch
from molre.errors import DataError, WeightsError
from molre.findings import FINDING_IDS, FINDINGS
from molre.models import MoLREClassifier, build_model
from molre.train.checkpoint import load_trained_state, read_config, read_setup, read_weights
from molre.train.metrics import per_finding_auc, summarize


def load_checkpoint_model(checkpoint: str, device: str = "cpu", preset: str | None = None):
    """The classifier of a checkpoint with its best weights, in eval mode, plus its config and data facts."""
    cfg = read_config(checkpoint)
    if preset and preset != cfg.backbone.preset:
        raise WeightsError(f"checkpoint {checkpoint} holds preset {cfg.backbone.preset}, not {preset}")
    torch.manual_seed(
        cfg.train.seed
    )  # the frozen backbone is rebuilt as in training when it has no weights file
    model = build_model(cfg)
    load_trained_state(model, read_weights(checkpoint, "best"), checkpoint)
    return model.to(device).eval(), cfg, read_setup(checkpoint)


def _iter_split(root: str, split: str, batch_size: int):
    manifest = shards.read_manifest(root)
    for uri in shards.list_shards(root, split, manifest):
        table = shards.read_shard(uri, verify=True)  # checksum + schema: a corrupt shard is never scored
        for batch in table.to_batches(max_chunksize=batch_size):
            yield batch.to_pydict()


@torch.no_grad()
def score_volumes(model: MoLREClassifier, cfg: RunConfig, setup: dict, hu: torch.Tensor) -> torch.Tensor:
    x = augment_batch(hu, cfg.data, torch.Generator(), train=False, out_size=tuple(setup["input_size"]))
    return torch.sigmoid(model(x.to(next(model.parameters()).device)).float())


def evaluate(
    checkpoint: str, data: str, split: str = "test", out_dir: str | None = None, device: str = "cpu"
) -> dict:
    model, cfg, setup = load_checkpoint_model(checkpoint, device)
    scores, labels, known = [], [], []
    for batch in _iter_split(data, split, cfg.train.batch_size):
        volumes = [shards.decode_volume(v, s) for v, s in zip(batch["volume"], batch["shape"], strict=True)]
        scores.append(score_volumes(model, cfg, setup, torch.from_numpy(np.stack(volumes))).cpu().numpy())
        labels.append(np.asarray(batch["labels"]))
        known.append(np.asarray(batch["known"]))
    if not scores:
        raise WeightsError(f"split '{split}' of {data} has no volumes to evaluate")
    aucs = per_finding_auc(np.concatenate(scores), np.concatenate(labels), np.concatenate(known))
    summary = summarize(aucs)
    table = pd.DataFrame({
        "finding": FINDING_IDS, "name": [f.name for f in FINDINGS], "category": [f.category for f in FINDINGS],
        "auc": aucs, "positives": np.concatenate(labels).sum(0) if labels else 0,
    })  # fmt: skip
    out = str(out_dir or storage.join(str(checkpoint), f"eval-{split}"))
    parquet = io.BytesIO()
    table.to_parquet(parquet)
    result = {
        **summary.as_dict(),
        "undefined": summary.undefined,
        "volumes": int(sum(len(s) for s in scores)),
    }
    for name, data in (
        ("per_finding_auc.parquet", parquet.getvalue()),
        ("per_finding_auc.md", _markdown(table, summary, split).encode()),
        ("summary.json", json.dumps(_json_safe(result), indent=1, allow_nan=False).encode()),
    ):
        storage.write_bytes(storage.join(out, name), data)
    return {**result, "out_dir": out}


def _json_safe(value):
    """``value`` with every NaN / infinity as None: strict JSON (an undefined mean AUC is null, not NaN)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _markdown(table: pd.DataFrame, summary, split: str) -> str:
    lines = [
        f"# Per-finding AUC ({split})",
        "",
        f"Mean AUC {summary.mean:.3f} +- {summary.std:.3f} over {summary.n_defined} findings with both classes; "
        f"AUC >= 0.90: {summary.n_high}; 0.80-0.90: {summary.n_moderate}; undefined: {len(summary.undefined)}.",
        "",
        "| finding | category | positives | AUC |",
        "|---|---|---:|---:|",
    ]
    for row in table.itertuples():
        auc = "undefined" if np.isnan(row.auc) else f"{row.auc:.3f}"
        lines.append(f"| {row.name} | {row.category} | {int(row.positives)} | {auc} |")
    return "\n".join(lines) + "\n"


def predict(checkpoint: str, series: str, device: str = "cpu") -> dict:
    """Probabilities, per-slice routing weights and per-slice attention for one study: a DICOM series folder (or
    one of its files), a study folder (its series with the most slices that loads, as preprocess picks), or a
    NIfTI file."""
    model, cfg, setup = load_checkpoint_model(checkpoint, device)
    volume = study_volume(series, setup)
    probs = score_volumes(model, cfg, setup, torch.from_numpy(volume)[None])[0].cpu().numpy()
    routing, attention = model.router_weights(), model.slice_attention()
    return {
        "probabilities": {fid: float(p) for fid, p in zip(FINDING_IDS, probs, strict=True)},
        "router_weights": routing[0].cpu().numpy().round(5).tolist() if routing is not None else None,
        "slice_attention": attention[0].cpu().numpy().round(5).tolist() if attention is not None else None,
    }


def study_volume(path: str, setup: dict) -> np.ndarray:
    """int16 HU ``[grid]`` of the study at ``path``, prepared as preprocess prepared the run's training shards:
    its alignment, grid, spacing, anti-aliasing and minimum slice count (``setup``, from the checkpoint)."""
    from molre.data.resample import align_volume

    loaded = _load_study(path, setup["min_slices"])
    return align_volume(loaded.hu, loaded.spacing, loaded.direction, out_spacing=tuple(setup["spacing"]),
                        grid=tuple(setup["grid"]), antialias=setup["antialias"])  # fmt: skip


def _load_study(path: str, min_slices: int):
    """The HU volume of the one study at ``path``; several studies there, or none that loads, is a DataError."""
    from molre.data.ingest import largest_first, load_series

    errors = []
    for ref in largest_first(_study_series(path)):  # as preprocess tries a study's series
        try:
            return load_series(ref, min_slices=min_slices)
        except DataError as err:
            errors.append(err)
    raise errors[0]


def _study_series(path: str) -> list:
    """The series of one study at ``path`` (a folder, a DICOM file's series, or a NIfTI file)."""
    from molre.data.ingest import discover

    target = Path(path)
    if not target.exists():
        raise DataError(path, "does not exist")
    folder = target if target.is_dir() else target.parent
    refs, rejects = discover(folder)
    if not target.is_dir():  # the series holding that file
        name = str(folder / target.name)
        refs = [r for r in refs if name in r.files]
        rejects = [e for e in rejects if e.path == name]
    if not refs:
        raise rejects[0] if rejects else DataError(path, "no DICOM series or NIfTI file found")
    studies = {r.study_uid or r.source for r in refs}  # a NIfTI file is a study of its own
    if len(studies) > 1:
        shown = ", ".join(sorted(r.source for r in refs)[:3])
        raise DataError(path, f"holds {len(studies)} studies ({shown}, ...); give one study's folder or file")
    return refs


# ---- CLI (two commands share this module) -----------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "checkpoint", help="a checkpoint directory written by molre train (local path or s3://)"
    )
    if parser.prog.endswith("evaluate"):
        parser.add_argument("--data", required=True, help="preprocessed shard root (local path or s3://)")
        parser.add_argument("--split", default="test", choices=["train", "val", "test"])
        parser.add_argument(
            "--out", help="output directory, local path or s3:// (default: CHECKPOINT/eval-SPLIT)"
        )
    else:
        parser.add_argument(
            "--input", required=True, help="one study: a DICOM folder or file, or a NIfTI file"
        )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> int:
    if hasattr(args, "data"):
        result = evaluate(args.checkpoint, args.data, args.split, args.out, args.device)
        scored = (
            f"mean AUC {result['mean_auc']:.4f} +- {result['std_auc']:.4f} over {result['n_defined']} findings"
            if result["n_defined"]
            else "no AUC: no finding has both classes among the split's known labels"
        )
        print(f"{scored} on {result['volumes']} volumes; written to {result['out_dir']}")
    else:
        print(json.dumps(predict(args.checkpoint, args.input, args.device), indent=1))
    return 0
