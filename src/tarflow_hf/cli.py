"""`tarflow-hf` command line: one sub-command per task.

Fast to answer `--help`: arguments are declared in `tarflow_hf.arguments` (standard library only), and a
sub-command's module (which imports torch, diffusers, ...) is imported only to run it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

# Each entry: (name, module path, help). The module provides `run(args) -> int`; its arguments are
# `tarflow_hf.arguments.ARGUMENTS[name]` (also the module's `add_arguments`).
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "tarflow_hf.train", "train or fine-tune a TarFlow model with accelerate (single or multi-process)"),
    ("evaluate", "tarflow_hf.evaluate", "bits/dim, FID and class-consistency accuracy of a pipeline folder, as JSON"),
    ("convert", "tarflow_hf.convert", "convert an apple/ml-tarflow .pth checkpoint to a pipeline folder (or back)"),
    ("sample", "tarflow_hf.sample", "sample images from a TarFlow pipeline (folder or Hub id) into a captioned grid"),
]


class CommandError(Exception):
    """A user mistake: printed as one line, exit status 2."""


USER_ERRORS = (CommandError, ValueError, FileNotFoundError, FileExistsError)


def _runner(module_path: str) -> Callable[[argparse.Namespace], int]:
    """The sub-command's `run`, importing its module only when called."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module_path).run(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from .arguments import ARGUMENTS

    parser = argparse.ArgumentParser(prog="tarflow-hf", description="TarFlow normalizing flows for Hugging Face")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_path, help_text in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](command)
        command.set_defaults(run=_runner(module_path))
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
    from .arguments import ARGUMENTS

    module_path, help_text = next((path, text) for command, path, text in COMMANDS if command == name)
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module_path}", description=help_text)
    ARGUMENTS[name](parser)
    return _execute(parser.prog, _runner(module_path), parser.parse_args(argv))


if __name__ == "__main__":
    # Run through the package module, so sub-commands raise the same CommandError class this catches.
    from tarflow_hf.cli import main as package_main

    sys.exit(package_main())
