"""`tarflow-hf` command line: one sub-command per task, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# Each entry: (name, module path, help). The module provides `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "tarflow_hf.train", "train or fine-tune a TarFlow model with accelerate (single or multi-process)"),
    ("evaluate", "tarflow_hf.evaluate", "bits/dim, FID and class-consistency accuracy of a pipeline folder, as JSON"),
    ("convert", "tarflow_hf.convert", "convert an apple/ml-tarflow .pth checkpoint to a pipeline folder (or back)"),
    ("sample", "tarflow_hf.sample", "sample images from a TarFlow pipeline (folder or Hub id) into a captioned grid"),
]


class CommandError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="tarflow-hf", description="TarFlow normalizing flows for Hugging Face")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_path, help_text in COMMANDS:
        module = importlib.import_module(module_path)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args) or 0
    except (CommandError, ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"tarflow-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run through the package module, so sub-commands raise the same CommandError class this catches.
    from tarflow_hf.cli import main as package_main

    sys.exit(package_main())
