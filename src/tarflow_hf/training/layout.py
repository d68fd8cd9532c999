"""The run folder (`--output-dir`): what a run writes there, by name. Standard library only.

```
OUTPUT/
  recipe.json                      the resolved flags and the schedule's lengths
  metrics.jsonl                    one JSON line per logged step
  checkpoints/checkpoint-{step}/   accelerate's state and ours (progress.json, EMA, noise generators)
  samples/step_{step:07d}.png      sample grids during training (--sample-every)
  samples/final.png                the final grid
  model/                           the pipeline folder with its model card
  train_summary.json               the last metrics and the wall time
```

Outputs of another branch of the run are kept beside them under `.superseded` names (`training.branches`).
"""

from __future__ import annotations

import re

RECIPE_FILE = "recipe.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
SAMPLES_DIR = "samples"
STEP_GRID = re.compile(r"step_(\d+)\.png")
FINAL_GRID = "final"  # samples/final.png
MODEL_DIR = "model"
SUMMARY_FILE = "train_summary.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def step_grid_name(step: int) -> str:
    """The name (without `.png`) of the sample grid of `step`."""
    return f"step_{step:07d}"


__all__ = [
    "CHECKPOINTS",
    "CHECKPOINT_NAME",
    "FINAL_GRID",
    "METRICS_FILE",
    "MODEL_DIR",
    "RECIPE_FILE",
    "SAMPLES_DIR",
    "STEP_GRID",
    "SUMMARY_FILE",
    "checkpoint_name",
    "step_grid_name",
]
