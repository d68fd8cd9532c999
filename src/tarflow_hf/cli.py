"""`tarflow-hf` command line: one sub-command per task, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
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


USER_ERRORS = (CommandError, ValueError, FileNotFoundError, FileExistsError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tarflow-hf", description="TarFlow normalizing flows for Hugging Face")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_path, help_text in COMMANDS:
        module = importlib.import_module(module_path)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(run=module.run)
    return parser


def _execute(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    try:
        return run(args) or 0
    except USER_ERRORS as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _execute(f"tarflow-hf {args.command}", args.run, args)


def run_command(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """One sub-command on its own, for `python -m tarflow_hf.<module>` and the conversion script."""
    module_path, help_text = next((path, text) for command, path, text in COMMANDS if command == name)
    module = importlib.import_module(module_path)
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module_path}", description=help_text)
    module.add_arguments(parser)
    return _execute(parser.prog, module.run, parser.parse_args(argv))


if __name__ == "__main__":
    # Run through the package module, so sub-commands raise the same CommandError class this catches.
    from tarflow_hf.cli import main as package_main

    sys.exit(package_main())
