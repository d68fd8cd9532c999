"""`tarflow-hf evaluate`: bits/dim, FID and class-consistency accuracy of a pipeline, printed (and written) as JSON.
Under `accelerate launch -m tarflow_hf evaluate ...` the work is split across the processes (see
`tarflow_hf.evaluate`)."""

from __future__ import annotations

import argparse
import json

from ..evaluate import evaluate
from ..fileio import write_text_atomic


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    results = evaluate(args)
    if PartialState().is_main_process:
        text = json.dumps(results, indent=2)
        print(text)
        if args.output:
            write_text_atomic(args.output, text + "\n")
    return 0
