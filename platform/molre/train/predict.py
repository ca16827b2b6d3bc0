"""`molre predict`: score raw studies (DICOM / NIfTI on local disk) with a checkpoint.

Per study (one, or a batch with the model loaded once) the 75 probabilities, the routing weights and attention
weight of each slice, what was scored (series, slices, spacing, skipped files) and by which model, and with
``--thresholds`` each finding's flag at the file's thresholds. A study is prepared as preprocess prepared the
run's training shards (alignment, grid, spacing, anti-aliasing: the checkpoint's ``setup.json``); a checkpoint
trained on data preprocessed unlike this molre prepares a study is refused. Takes a checkpoint folder or a run
folder (its latest checkpoint) and scores as the run's validation did (``molre.train.scoring``), in-process on
one device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

from molre import __version__
from molre.config import RunConfig
from molre.data import storage
from molre.errors import DataError, MolreError
from molre.findings import FINDING_IDS, FINDINGS
from molre.models import MoLREClassifier
from molre.train import operating_points as op
from molre.train.checkpoint import RECORDED_AS_IS, preprocessing_changes
from molre.train.scoring import (
    add_checkpoint_arguments,
    announced,
    load_checkpoint_model,
    model_identity,
    preprocessing_verdict,
    resolve_checkpoint,
    score_volumes,
    scoring_precision,
)

if TYPE_CHECKING:
    from molre.data.ingest import SeriesRef, Volume

log = logging.getLogger(__name__)


def predict(
    checkpoint: str,
    series: str,
    device: str = "cpu",
    *,
    allow_preprocessing_mismatch: bool = False,
    thresholds: str | None = None,
) -> dict:
    """The prediction of one study (``predict_studies``); an input that cannot be scored is a DataError."""
    return next(predict_studies(checkpoint, [series], device, keep_going=False, thresholds=thresholds,
                                allow_preprocessing_mismatch=allow_preprocessing_mismatch))  # fmt: skip


def predict_studies(
    checkpoint: str,
    inputs: Sequence[str],
    device: str = "cpu",
    keep_going: bool = True,
    *,
    allow_preprocessing_mismatch: bool = False,
    thresholds: str | None = None,
) -> Iterator[dict]:
    """One prediction per input, the model loaded once. An input is one study on local disk: a DICOM series
    folder (or one of its files), a study folder (its series with the most slices that loads, as preprocess
    picks) or a NIfTI file. ``checkpoint``: a checkpoint folder, or a run folder (``resolve_checkpoint``).

    Each prediction holds
      input            ``path`` as given; ``series``: the series scored, relative to that folder (to a given
                       file's folder), "." for the folder itself; ``kind``; ``slices`` read; ``spacing_mm``:
                       its native voxel size (z, y, x) before alignment
      model            checkpoint folder, preset, adapter (MoLRE placement, route_by, experts), the grid and
                       spacing the model was trained on, molre version, ``precision`` scored in (bf16 / fp32,
                       as the run's validation on this device: ``score_volumes``) and ``preprocessing``: the
                       checkpoint's recorded settings against this molre's (``_check_study_preprocessing``)
      findings         id, name and category of each finding, in output order
      probabilities    {finding id: probability}
      flags            with ``thresholds`` only: {finding id: probability >= the file's threshold, or null
                       where the file has none}
      slice_z_mm       2D backbones: index i of ``slice_attention`` and of each ``router_weights`` row is the
                       i-th slice the model saw, inferior to superior; its centre in mm above the centre of
                       the aligned grid (``model_slice_z_mm``), not an input slice. null for 3D backbones.
      slice_attention  the attention pooling's weight of each slice (2D; null for 3D)
      router_weights   MoLRE's gates of the scored study: on slice features (placement=features), one row of K
                       per slice (2D) or one K-vector (3D); inside the backbone (placement=blocks,
                       route_by=slice) ``{module name: rows}`` likewise, one entry per adapted linear; null
                       without MoLRE and for route_by=token, whose gates are per token and not reported
      skipped_files    unreadable files in the scored series' folder(s), left out of it (name, reason)
    With ``keep_going``, an input that cannot be scored gives ``{"input": {"path"}, "model", "error": {"file",
    "reason"}}`` and the next one is scored; otherwise its error is raised. A checkpoint trained on data
    preprocessed unlike this molre prepares a study is a DataError (before any input is read), or with
    ``allow_preprocessing_mismatch`` a warning recorded in ``model.preprocessing``.

    ``thresholds``: a thresholds.json (local or s3://) written for this checkpoint's model by ``molre evaluate
    --operating-point`` (another model's is a ConfigError before any input is read:
    ``operating_points.check_thresholds_model``); ``model.operating_point`` records its rule, split, file and
    sha256. Without it the output has neither ``flags`` nor ``model.operating_point``.
    """
    checkpoint, picked = resolve_checkpoint(checkpoint)
    if picked:
        log.info("predict: %s", picked)
    fixed = op.read_thresholds(thresholds) if thresholds else None  # a bad file fails before the model loads
    model, cfg, setup = load_checkpoint_model(checkpoint, device)
    preprocessing = _check_study_preprocessing(checkpoint, setup, allow_preprocessing_mismatch)
    facts = {**_model_facts(checkpoint, cfg, setup), "precision": scoring_precision(cfg, device),
             "preprocessing": preprocessing}  # fmt: skip
    if fixed:
        facts["operating_point"] = _predict_operating_point(fixed, checkpoint, setup, facts["precision"])
    for path in inputs:
        try:
            yield _predict_study(model, cfg, setup, facts, str(path), fixed)
        except (MolreError, OSError, ValueError) as err:
            if not keep_going:
                raise
            file, reason = (err.path, err.reason) if isinstance(err, DataError) else (str(path), _reason(err))
            yield {"input": {"path": str(path)}, "model": facts, "error": {"file": file, "reason": reason}}


def _reason(err: Exception) -> str:
    return str(err) if isinstance(err, MolreError) else f"{type(err).__name__}: {err}"


def _predict_operating_point(fixed: op.ThresholdsFile, checkpoint: str, setup: dict, precision: str) -> dict:
    """predict's ``model.operating_point``: the thresholds file checked against the loaded model and what the
    predictions record of it."""
    verified = op.check_thresholds_model(fixed, model_identity(setup), checkpoint, precision)
    return {**fixed.applied(), "decision": op.DECISION, "model_verified": verified}


def _flags(probabilities: dict[str, float], thresholds: np.ndarray) -> dict[str, bool | None]:
    """{finding id: probability >= threshold; None where the threshold is NaN}: evaluate's decision rule
    (``operating_points``) on the probabilities as output (float32 values, compared exactly in float64)."""
    return {fid: None if math.isnan(t) else bool(p >= t)
            for (fid, p), t in zip(probabilities.items(), thresholds.tolist(), strict=True)}  # fmt: skip


def _predict_study(model: MoLREClassifier, cfg: RunConfig, setup: dict, facts: dict, path: str,
                   fixed: op.ThresholdsFile | None = None) -> dict:  # fmt: skip
    study = read_study(path, setup["min_slices"])
    volume = torch.from_numpy(_aligned(study.volume, setup))[None]
    probs = score_volumes(model, cfg, setup, volume)[0].cpu().numpy()
    probabilities = {fid: float(p) for fid, p in zip(FINDING_IDS, probs, strict=True)}
    routing, attention = model.router_weights(), model.slice_attention()
    if routing is None and cfg.adapter.kind == "molre" and cfg.adapter.molre.placement == "blocks":
        routing = model.router_weights(in_blocks=True) or None  # {} under route_by=token: not reported
    routing_rows = (
        {name: _study_rows(g) for name, g in routing.items()}
        if isinstance(routing, dict)
        else _study_rows(routing)
        if routing is not None
        else None
    )
    return {
        "input": {
            "path": path,
            "series": os.path.relpath(study.ref.source, study.base),
            "kind": study.ref.kind,
            "slices": int(study.volume.hu.shape[0]),
            "spacing_mm": [round(float(s), 4) for s in study.volume.spacing],
        },
        "model": facts,
        "findings": [{"id": f.id, "name": f.name, "category": f.category} for f in FINDINGS],
        "probabilities": probabilities,
        **({"flags": _flags(probabilities, fixed.values)} if fixed else {}),
        "slice_z_mm": model_slice_z_mm(setup) if model.backbone.dims == 2 else None,
        "slice_attention": _study_rows(attention) if attention is not None else None,
        "router_weights": routing_rows,
        "skipped_files": [
            {"file": os.path.relpath(e.path, study.base), "reason": e.reason} for e in study.skipped
        ],
    }


def _study_rows(weights: torch.Tensor) -> list:
    """The scored study's (batch row 0) weights as rounded floats; bf16 under bf16 autocast, which numpy lacks."""
    return weights[0].float().cpu().numpy().round(5).tolist()


def model_slice_z_mm(setup: dict) -> list[float]:
    """Where each slice a 2D model sees lies, inferior to superior: its centre in mm above the centre of the
    aligned grid. Alignment puts ``grid[0]`` slices of ``spacing[0]`` mm around the head (the skull's z-extent
    centred, or its top kept one slice below the grid's top; within half an input slice, as the grid snaps to
    the input's voxels); the model takes ``input_size[0]`` = n slices resampled over the same box
    (``resize_volume``: trilinear, align_corners=False): slice i sits at (i + 1/2 - n/2) * grid depth / n."""
    slices, depth_mm = int(setup["input_size"][0]), setup["grid"][0] * setup["spacing"][0]
    return [round((i + 0.5 - slices / 2) * depth_mm / slices, 3) for i in range(slices)]


def _model_facts(checkpoint: str, cfg: RunConfig, setup: dict) -> dict:
    adapter: dict = {"kind": cfg.adapter.kind}
    if cfg.adapter.kind == "molre":
        m = cfg.adapter.molre
        adapter.update(placement=m.placement, route_by=m.route_by, experts=m.experts)
    return {"checkpoint": checkpoint, "preset": cfg.backbone.preset, "adapter": adapter,
            "grid": list(setup["grid"]), "spacing_mm": list(setup["spacing"]),
            "molre_version": __version__}  # fmt: skip


def this_molre_preprocessing() -> dict:
    """The ``RECORDED_AS_IS`` settings (HU range, pad value, alignment, interpolation) of this molre's
    preprocessing, which predict applies to a study: constants of the code, read from the record preprocess
    writes of them into a manifest (``PreprocessConfig.as_dict``) so that the two cannot drift apart."""
    from molre.data.preprocess import PreprocessConfig

    recorded = PreprocessConfig().as_dict()
    return {key: recorded[key] for key in RECORDED_AS_IS}


def _check_study_preprocessing(checkpoint: str, setup: dict, allow: bool) -> dict:
    """predict prepares a study with the checkpoint's grid, spacing, anti-aliasing and minimum slice count
    (``setup``), but with this molre's HU range, pad value, alignment and interpolation, which it cannot set: a
    checkpoint whose training data was preprocessed with others is a DataError naming each setting, unless
    ``allow`` (a warning). A checkpoint from before they were recorded is not compared (a warning). Returns what
    each prediction records, as evaluate's summary.json does."""
    changes, unknown = preprocessing_changes(setup, this_molre_preprocessing(), RECORDED_AS_IS, "this molre")
    listed = "; ".join(changes)
    return preprocessing_verdict(
        changes, unknown, allow, log,
        not_compared=f"predict: preprocessing settings not compared between checkpoint {checkpoint} and this molre",
        refused=(storage.join(checkpoint, "setup.json"),
                 f"checkpoint {checkpoint} was trained on data preprocessed unlike this molre prepares a study: "
                 f"{listed}. The model would score inputs it was not trained on; predict with the molre version "
                 "that trained it, or pass --allow-preprocessing-mismatch to predict anyway"),
        allowed=f"predict: checkpoint {checkpoint} was trained on data preprocessed unlike this molre prepares a "
                f"study ({listed}); predicting anyway (--allow-preprocessing-mismatch)",
    )  # fmt: skip


class Study(NamedTuple):
    """One study as ``read_study`` loaded it."""

    volume: Volume  # the series scored
    ref: SeriesRef
    base: str  # what names are relative to: the given folder, or a given file's folder
    skipped: list[DataError]  # unreadable files in the series' folder(s), left out of the series


def study_volume(path: str, setup: dict) -> np.ndarray:
    """int16 HU ``[grid]`` of the study at ``path``, prepared as preprocess prepared the run's training
    shards: its alignment, grid, spacing, anti-aliasing and minimum slice count (``setup``, from the
    checkpoint)."""
    return _aligned(read_study(path, setup["min_slices"]).volume, setup)


def _aligned(volume: Volume, setup: dict) -> np.ndarray:
    from molre.data.resample import align_volume

    return align_volume(volume.hu, volume.spacing, volume.direction, out_spacing=tuple(setup["spacing"]),
                        grid=tuple(setup["grid"]), antialias=setup["antialias"])  # fmt: skip


def read_study(path: str, min_slices: int) -> Study:
    """The one study at ``path``; several studies there, or none that loads, is a DataError. Its series are
    tried as preprocess tries them (``largest_first``). The files discover could not read in the folder(s) of
    the series scored come back as ``skipped``; when a series fails, they are added to its error's reason (a
    truncated slice otherwise reads as a gap after its neighbour)."""
    from molre.data.ingest import largest_first, load_series

    refs, rejects, base = _study_series(path)
    errors = []
    for ref in largest_first(refs):
        skipped = _rejects_in_folders(ref, rejects)
        try:
            return Study(load_series(ref, min_slices=min_slices), ref, base, skipped)
        except DataError as err:
            if skipped:
                left_out = _named(skipped, base)
                err = DataError(err.path, f"{err.reason}; unreadable file(s) in its folder: {left_out}")
            errors.append(err)
    raise errors[0]


def _rejects_in_folders(ref: SeriesRef, rejects: list[DataError]) -> list[DataError]:
    """The rejects lying in a folder that holds files of the DICOM series ``ref`` (none for a NIfTI file)."""
    folders = {os.path.dirname(f) for f in ref.files} if ref.kind == "dicom" else set()
    return [e for e in rejects if os.path.dirname(e.path) in folders]


def _named(errors: list[DataError], base: str, shown: int = 5) -> str:
    names = [f"{os.path.relpath(e.path, base)} ({e.reason})" for e in errors[:shown]]
    return ", ".join(names) + (f", and {len(errors) - shown} more" if len(errors) > shown else "")


def _study_series(path: str) -> tuple[list[SeriesRef], list[DataError], str]:
    """The series of one study at ``path`` (a folder, a DICOM file's series, or a NIfTI file), the files under
    that folder (a file's folder) that discover could not read, and that folder."""
    from molre.data.ingest import discover

    if "://" in str(path):
        raise DataError(path, "predict reads local files only; copy the study to a local folder first")
    target = Path(path)
    if not target.exists():
        raise DataError(path, "does not exist")
    folder = target if target.is_dir() else target.parent
    refs, rejects = discover(folder)
    if not target.is_dir():  # the series holding that file
        name = str(folder / target.name)
        refs = [r for r in refs if name in r.files]
        if not refs:
            rejects = [e for e in rejects if e.path == name]
    if not refs:
        raise rejects[0] if rejects else DataError(path, "no DICOM series or NIfTI file found")
    studies = {r.study_uid or r.source for r in refs}  # a NIfTI file is a study of its own
    if len(studies) > 1:
        shown = ", ".join(sorted(r.source for r in refs)[:3])
        raise DataError(path, f"holds {len(studies)} studies ({shown}, ...); give one study's folder or file")
    return refs, rejects, str(folder)


# ---- CLI --------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument(
        "--input", action="append", default=[], metavar="SERIES",
        help="one study on local disk: a DICOM folder or file, or a NIfTI file; repeat it for several "
        "(one JSON object per line then)",
    )  # fmt: skip
    parser.add_argument(
        "--inputs", metavar="FILE",
        help="a text file listing studies, one path per line (blank lines and lines starting with # "
        "skipped); writes one JSON object per line, an error object for a study that cannot be scored",
    )  # fmt: skip
    parser.add_argument(
        "--allow-preprocessing-mismatch",
        action="store_true",
        help="predict with a checkpoint whose training data was preprocessed unlike this molre prepares a "
        "study (other HU range, pad value, alignment or interpolation) with a warning, recorded in the "
        "output's model.preprocessing, instead of refusing it",
    )
    parser.add_argument(
        "--thresholds", metavar="FILE",
        help="a thresholds.json (local path or s3://) that molre evaluate --operating-point wrote for this "
        "checkpoint: each prediction gets flags, {finding id: score >= its threshold; null where it has "
        "none}, and model.operating_point; refused for another checkpoint's file",
    )  # fmt: skip


def run(args) -> int:
    """One study (a single --input): one JSON document, its errors raised (exit 2). Several (--input repeated
    or --inputs): JSON Lines, one object per study as it is scored; exit 1 when any failed."""
    inputs = list(args.input) + (_input_list(args.inputs) if args.inputs else [])
    if not inputs:
        print("molre predict: error: give --input SERIES (repeatable) or --inputs FILE", file=sys.stderr)
        return 2
    checkpoint = announced(args)
    options = {
        "allow_preprocessing_mismatch": args.allow_preprocessing_mismatch,
        "thresholds": args.thresholds,
    }
    if len(args.input) == 1 and not args.inputs:
        result = predict(checkpoint, inputs[0], args.device, **options)
        _warn_skipped(result)
        print(json.dumps(result, indent=1))
        return 0
    failed = 0
    for result in predict_studies(checkpoint, inputs, args.device, **options):
        if "error" in result:
            failed += 1
            error = result["error"]
            print(f"molre predict: error: {error['file']}: {error['reason']}", file=sys.stderr)
        _warn_skipped(result)
        print(json.dumps(result), flush=True)
    if failed:
        print(f"molre predict: {failed} of {len(inputs)} studies could not be scored", file=sys.stderr)
    return 1 if failed else 0


def _warn_skipped(result: dict) -> None:
    skipped = result.get("skipped_files") or []
    if skipped:
        names = ", ".join(f"{s['file']} ({s['reason']})" for s in skipped)
        print(f"molre predict: warning: {result['input']['path']}: {len(skipped)} unreadable file(s) left "
              f"out of the series scored: {names}", file=sys.stderr)  # fmt: skip


def _input_list(path: str) -> list[str]:
    """The studies listed in ``path``, one a line, as written (relative ones from the current folder)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(path, f"cannot read the list of inputs ({type(err).__name__})") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
