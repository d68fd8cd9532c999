"""A run's history can branch: resuming at step k (a fresh start is k = 0) continues from there, and what the run
wrote for later steps belongs to another branch. Nothing of it is deleted: before the first step it is moved aside
under `.superseded` names (`.superseded-2`, ... when taken), and the run prints where, so that `--resume latest`, the
checkpoint rotation, the metrics log and the final outputs hold this branch alone:

- checkpoints after step k: `checkpoints/checkpoint-8.superseded`;
- sample grids after step k: `samples/step_0000008.superseded.png`;
- the metrics lines after step k (and a line cut short by a kill): `metrics.superseded.jsonl`; `metrics.jsonl`
  keeps steps 1..k, each once;
- the final outputs of a finished branch (`model/`, `samples/final.png`, `train_summary.json`), unless this run
  rewrites them from the very state they were made from (resumed at their step, with nothing left to train):
  `model.superseded/`, `samples/final.superseded.png`, `train_summary.superseded.json`;
- `recipe.json` when this run's recipe differs: `recipe.superseded.json`.

The outputs of one branch (final outputs, metrics, recipe) share one suffix.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import clean_stale_temporaries, write_text_atomic
from .adapter import is_model_folder
from .checkpoints import checkpoint_step, list_checkpoints
from .layout import (
    CHECKPOINT_NAME,
    CHECKPOINTS,
    FINAL_GRID,
    METRICS_FILE,
    MODEL_DIR,
    RECIPE_FILE,
    SAMPLES_DIR,
    STEP_GRID,
    SUMMARY_FILE,
)
from .metrics import rewind_metrics

if TYPE_CHECKING:
    from .state import Run

SUPERSEDED = ".superseded"
# The names under OUTPUT and OUTPUT/samples that the run writes atomically: their temporaries are its own.
RUN_FILES = re.compile("|".join(re.escape(name) for name in (MODEL_DIR, SUMMARY_FILE, RECIPE_FILE, METRICS_FILE)))
GRID_FILES = re.compile(rf"{STEP_GRID.pattern}|{re.escape(FINAL_GRID)}\.png")


def aside_path(path: Path, tag: str) -> Path:
    """Where `path` goes aside: `checkpoint-8` -> `checkpoint-8{tag}`, `final.png` -> `final{tag}.png`."""
    if path.is_dir():
        return path.with_name(path.name + tag)
    return path.with_name(path.stem + tag + path.suffix)


def free_tag(paths: list[Path]) -> str:
    """`.superseded`, else `.superseded-2`, ...: the first suffix under which none of `paths` has a namesake."""
    count = 1
    while True:
        tag = SUPERSEDED if count == 1 else f"{SUPERSEDED}-{count}"
        if not any(aside_path(path, tag).exists() for path in paths):
            return tag
        count += 1


def move_aside(path: Path, tag: str | None = None) -> Path:
    target = aside_path(path, tag or free_tag([path]))
    path.rename(target)
    return target


def final_step(output_dir: Path) -> int | None:
    """The step of the finished branch's final outputs (train_summary.json), None when unknown."""
    try:
        step = json.loads((output_dir / SUMMARY_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None


def recipe_differs(path: Path, recipe: dict[str, Any]) -> bool:
    try:
        return json.loads(path.read_text()) != json.loads(json.dumps(recipe))
    except (OSError, ValueError):
        return True


def check_model_dir(output_dir: Path) -> None:
    """OUTPUT/model, which the run writes at its end, is found now if it is not a pipeline (or LoRA) folder of ours."""
    model_dir = output_dir / MODEL_DIR
    if (model_dir.exists() or model_dir.is_symlink()) and not is_model_folder(model_dir):
        raise FileExistsError(
            f"{model_dir} exists and is not a pipeline folder tarflow-hf wrote; move it, or choose another --output-dir"
        )


def branch_outputs(run: Run) -> list[Path]:
    """The outputs of another branch that this run would replace: the final outputs (unless rewritten from the
    state they were made from) and a recipe.json that differs."""
    output_dir, step = run.output_dir, run.progress.step
    found = []
    if step < run.total_steps or final_step(output_dir) != step:
        finals = (output_dir / MODEL_DIR, output_dir / SAMPLES_DIR / f"{FINAL_GRID}.png", output_dir / SUMMARY_FILE)
        found += [path for path in finals if path.exists()]
    recipe = output_dir / RECIPE_FILE
    if recipe.exists() and recipe_differs(recipe, run.recipe):
        found.append(recipe)
    return found


def supersede_branch(run: Run) -> list[tuple[Path, Path]]:
    """Move aside what another branch wrote for steps after this run's (see the module's docstring); return
    (where it was, where it is now) for each."""
    output_dir, step = run.output_dir, run.progress.step
    moved = [(path, move_aside(path)) for path in list_checkpoints(output_dir) if checkpoint_step(path) > step]
    samples = output_dir / SAMPLES_DIR
    grids = samples.iterdir() if samples.is_dir() else ()
    later = [path for path in grids if (match := STEP_GRID.fullmatch(path.name)) and int(match.group(1)) > step]
    moved += [(path, move_aside(path)) for path in sorted(later)]
    outputs, metrics = branch_outputs(run), output_dir / METRICS_FILE
    tag = free_tag([*outputs, metrics])
    moved += [(path, move_aside(path, tag)) for path in outputs]
    dropped = rewind_metrics(metrics, step)
    if dropped:
        write_text_atomic(aside_path(metrics, tag), "".join(dropped))
        moved.append((metrics, aside_path(metrics, tag)))
    return moved


def start_branch(run: Run) -> None:
    """Before the first step: remove what killed writes of earlier runs left, refuse an OUTPUT/model that is not
    ours, and move another branch's later outputs aside, saying where (the main process writes)."""
    output_dir, step = run.output_dir, run.progress.step
    if run.is_main:
        clean_stale_temporaries(output_dir, RUN_FILES)  # first: it may put back a model/ that a killed swap moved
        clean_stale_temporaries(output_dir / SAMPLES_DIR, GRID_FILES)
        clean_stale_temporaries(output_dir / CHECKPOINTS, CHECKPOINT_NAME)
    run.accelerator.wait_for_everyone()
    check_model_dir(output_dir)  # every process: none is left waiting for one that stopped
    if run.is_main:
        start = f"continuing from step {step}" if step else "starting afresh"
        for old, new in supersede_branch(run):
            what = f"the later lines of {old}" if old.name == METRICS_FILE else str(old)
            print(f"{start}: kept {what}, of another branch of this run, as {new}")
    run.accelerator.wait_for_everyone()


__all__ = ["SUPERSEDED", "aside_path", "free_tag", "start_branch", "supersede_branch"]
