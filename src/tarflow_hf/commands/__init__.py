"""The `tarflow-hf` command line: one sub-command per task, each a thin layer over the library.

The library (models, pipelines, samplers, conversion, training, evaluation) never imports this package: it raises
ordinary exceptions, which `main` turns into one line and exit status 2. `--help` is fast: arguments are declared in
`tarflow_hf.commands.arguments` (standard library only), and a sub-command's module, which imports torch and the
rest, is imported only to run it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

# Each entry: (name, module, help). The module provides `run(args) -> int`; its arguments are
# `tarflow_hf.commands.arguments.ARGUMENTS[name]`.
COMMANDS: list[tuple[str, str, str]] = [
    ("train", "tarflow_hf.commands.train", "train or fine-tune a TarFlow or STARFlow model with accelerate"),
    ("evaluate", "tarflow_hf.commands.evaluate", "bits/dim, FID and class-consistency accuracy of a pipeline, as JSON"),
    ("convert", "tarflow_hf.commands.convert", "convert an Apple .pth checkpoint to a pipeline folder (or back)"),
    ("sample", "tarflow_hf.commands.sample", "sample images from a pipeline (folder or Hub id) into a captioned grid"),
]


class CommandError(Exception):
    """A user mistake the command layer found itself: printed as one line, exit status 2."""


# What the library raises for bad input or a user's environment: printed as one line, never as a traceback.
USER_ERRORS = (CommandError, ValueError, OSError, FloatingPointError, UnicodeError)


def _runner(module_path: str) -> Callable[[argparse.Namespace], int]:
    """The sub-command's `run`, importing its module only when called."""

    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(module_path).run(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from .arguments import ARGUMENTS

    parser = argparse.ArgumentParser(prog="tarflow-hf", description="TarFlow and STARFlow normalizing flows")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_path, help_text in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        ARGUMENTS[name](command)
        command.set_defaults(run=_runner(module_path))
    return parser


def one_line(error: BaseException) -> str:
    """An exception as one line: its first non-empty line (a library message may carry details below it)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if isinstance(error, OSError) and error.filename and error.strerror and str(error.filename) not in text:
        text = f"{error.strerror}: {error.filename}"
    return text


def _quiet_optional_libraries() -> None:
    """A command's errors are one line: torchao, when installed for a torch it was not built against, announces on
    import that it skips its C++ kernels (a fact about the installation, not about the command)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)


def _execute(prog: str, run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    _quiet_optional_libraries()
    try:
        return run(args) or 0
    except USER_ERRORS as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _execute(f"tarflow-hf {args.command}", args.run, args)


def run_command(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """One sub-command on its own, for `python -m tarflow_hf.commands.<name>` and the conversion script."""
    from .arguments import ARGUMENTS

    module_path, help_text = next((path, text) for command, path, text in COMMANDS if command == name)
    parser = argparse.ArgumentParser(prog=prog or f"python -m {module_path}", description=help_text)
    ARGUMENTS[name](parser)
    return _execute(parser.prog, _runner(module_path), parser.parse_args(argv))


__all__ = ["COMMANDS", "CommandError", "build_parser", "main", "one_line", "run_command"]
