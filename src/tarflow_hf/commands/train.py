"""`tarflow-hf train`: train or fine-tune a model (see `tarflow_hf.train`); `accelerate launch -m tarflow_hf train
...` runs the same command on several processes."""

from __future__ import annotations

import argparse

from ..train import train


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0
