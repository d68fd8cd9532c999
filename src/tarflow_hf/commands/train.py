"""`tarflow-hf train`: train or fine-tune a model (`tarflow_hf.training`); `accelerate launch -m tarflow_hf train
...` runs the same command on several processes. The model card gets the command line that reproduces the run."""

from __future__ import annotations

import argparse
import shlex

from ..training import train
from .arguments import train as add_arguments


def format_command(args: argparse.Namespace) -> str:
    """The `tarflow-hf train` command line that reproduces `args` (options that differ from their defaults)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parts = ["tarflow-hf", "train"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.dest not in vars(args):
            continue
        value = getattr(args, action.dest)
        if action.dest == "drop_label" and value == 0 and action.default != 0:
            continue  # zeroed for an unconditional model (a recipe's resolved value), not asked for
        if value == action.default:
            continue
        flag = action.option_strings[0]
        parts += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, shlex.quote(str(value))]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    train(args, command=format_command(args))
    return 0
