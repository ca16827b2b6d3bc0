"""`molre <command> ...`: one entry point; each command lives in the module that does the work.

A command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only for
the command that runs, so `molre params` never imports Ray and `molre --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from molre.errors import MolreError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check-cluster": ("molre.cluster", "security + schema checks of ray_cluster.yaml / deploy/*.yaml"),
    "leaderboard": ("molre.tune.leaderboard", "Markdown + HTML leaderboard of a sweep's trials.parquet"),
    "params": ("molre.models.params", "parameter table of a preset (total, trainable, MoLRE share)"),
    "weights": ("molre.models.weights", "check a backbone checkpoint against a preset before a run uses it"),
    "preprocess": ("molre.data.preprocess", "DICOM/NIfTI + labels -> int16 HU Parquet shards on storage"),
    "synth": ("molre.data.synth", "synthetic head CTs with planted findings: DICOM/NIfTI + labels.csv"),
    "train": (
        "molre.train.run",
        "one MoLRE fine-tuning run on Ray Train (local Ray, or the cluster it runs on)",
    ),
    "sweep": ("molre.tune.sweep", "Ray Tune + Optuna sweep over a search-space file, with leaderboards"),
    "evaluate": ("molre.train.evaluate", "per-finding AUCs of a checkpoint on a split (Parquet + Markdown)"),
    "predict": ("molre.train.predict", "75 probabilities, routing and slice attention for one series"),
    "compare": ("molre.train.compare", "two evaluations on the same studies: per-finding DeLong tests, Holm"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="molre", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = _parser(command if command in COMMANDS else None).parse_args(argv)
    if args.command is None:
        _parser(None).print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command][0]).run(args) or 0)
    except MolreError as err:
        print(f"molre {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
