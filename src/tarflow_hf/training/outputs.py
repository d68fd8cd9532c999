"""What a run writes besides checkpoints and metrics: `recipe.json`, sample grids (`samples/step_{step}.png`,
`samples/final.png`), the pipeline folder `model/` with its model card, `train_summary.json`, and the upload of the
pipeline folder (`--push-to-hub`), whose requirements are checked before the first step."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import dataset_summary
from ..fileio import atomic_file, atomic_folder, write_json_atomic
from ..registry import looks_like_hub_repo_id
from .adapter import is_model_folder, lora_requested, save_adapter_folder
from .layout import FINAL_GRID, MODEL_DIR, RECIPE_FILE, SAMPLES_DIR, SUMMARY_FILE
from .metrics import log_images

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from .state import FlowModel, Run

logger = logging.getLogger(__name__)

# Keys of the arguments that do not describe the recipe.
NOT_RECIPE = ("run", "command", "push_to_hub", "no_progress", "resume", "stop_after_steps", "torch_threads")
# How a card names the model fine-tuned from with `--init-from bundled` (`tarflow_hf.BUNDLED_MODEL`, the folder
# tarflow_hf/bundled/tarflow-mnist): by that folder's name, as the README publishes the model.
BUNDLED_MODEL_NAME = "tarflow-mnist"
# The longest Hub repository id.


class UploadError(OSError):
    """The upload after training failed; the trained pipeline folder (`pipeline_dir`) is kept."""

    def __init__(self, message: str, pipeline_dir: Path):
        super().__init__(message)
        self.pipeline_dir = pipeline_dir


def build_recipe(run: Run) -> dict[str, Any]:
    """recipe.json: the resolved flags that describe the training, and the schedule's lengths."""
    recipe = {key: value for key, value in vars(run.args).items() if key not in NOT_RECIPE}
    accelerator = run.accelerator
    recipe.update(num_processes=accelerator.num_processes, total_steps=run.total_steps, warmup_steps=run.warmup_steps)
    return recipe


def start_outputs(run: Run) -> None:
    """recipe.json, the trackers, the progress bar and the one-line summary of the run."""
    args, accelerator = run.args, run.accelerator
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.output_dir / RECIPE_FILE, run.recipe, sort_keys=True)
    if run.trackers:
        accelerator.init_trackers("tarflow", config={k: v for k, v in run.recipe.items() if v is not None})
    if run.is_main and not args.no_progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=run.total_steps, initial=run.progress.step, desc="train", dynamic_ncols=True)
    accelerator.print(
        f"{dataset_summary(run.dataset)}; {run.total_steps} steps of {args.batch_size} at learning rate "
        f"{args.lr:g} ({accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation x "
        f"{run.micro_batch})"
    )


def write_sample_grid(run: Run, model: FlowModel, name: str) -> None:
    """The main process's sample grid `samples/{name}.png` at the model's (or --sample-guidance-scale) guidance,
    also sent to the trackers. Never stops training: a failure is a warning."""
    if not run.is_main:
        return
    path = run.output_dir / SAMPLES_DIR / f"{name}.png"
    try:
        grid = run.family.sample_grid(run, model)
        with atomic_file(path) as staging:
            grid.save(staging, format="PNG")
        log_images(run, grid)
    except Exception as error:
        logger.warning("sample grid %s failed, training goes on: %s: %s", path, type(error).__name__, error)


def dataset_name(dataset: str) -> str:
    """How a card names the dataset: a local folder by its folder name, anything else (mnist, a Hub dataset id)
    as given."""
    path = Path(dataset).expanduser()
    return path.resolve().name if path.exists() else dataset


def base_model_name(init_from: str | None) -> str | None:
    """How a card's `base_model` names the model fine-tuned from: a Hub id as is, the bundled model by its
    name; None for a local folder (the Hub's base_model names repositories, not local folders)."""
    from .. import BUNDLED_MODEL
    from ..hub import hub_id

    if not init_from:
        return None
    path = Path(init_from).expanduser()
    if init_from == "bundled" or (path.is_dir() and path.resolve() == Path(BUNDLED_MODEL).resolve()):
        return BUNDLED_MODEL_NAME
    return hub_id(init_from)


def save_pipeline_folder(
    pipe: DiffusionPipeline,
    target: Path,
    args: argparse.Namespace,
    recipe: dict[str, Any],
    summary: dict[str, Any],
    command: str | None,
    license: str | None = None,
) -> Path:
    """The final pipeline folder (replacing the one an earlier run of this output directory wrote, never a folder
    of another program), with a model card (tarflow_hf.hub) holding the recipe, the command and the last training
    metrics. The card names the Hub repository when the run pushes there, else the folder; fine-tuning names the
    base model (see `base_model_name`) and keeps its license unless `--license` is given. `pipe` is the family's
    pipeline around the trained model, saved with its own `save_pretrained`."""
    from ..hub import TrainingInfo, model_card

    card = model_card(
        pipe,
        repo_id=args.push_to_hub or str(target),
        license=getattr(args, "license", None) or license,
        datasets=[dataset_name(args.dataset)],
        base_model=base_model_name(args.init_from),
        training=TrainingInfo(recipe=recipe, command=command, metrics=summary),
    )
    with atomic_folder(target, overwrite=True, may_replace=is_model_folder) as staging:
        pipe.save_pretrained(staging, model_card=card, overwrite_model_card=True)
    return target


def save_final_outputs(run: Run, model: FlowModel, summary: dict[str, Any]) -> Path:
    """Main process: the pipeline folder (a LoRA run: the adapter folder), then train_summary.json, then the final
    grid (after the folder: a failing grid costs nothing)."""
    final_dir = run.output_dir / MODEL_DIR
    if lora_requested(run.args):
        base, dataset = base_model_name(run.args.init_from), dataset_name(run.args.dataset)
        save_adapter_folder(run, model, summary, base, dataset)
    else:
        pipe = run.family.build_pipeline(model)
        save_pipeline_folder(pipe, final_dir, run.args, run.recipe, summary, run.command, run.base_license)
    write_json_atomic(run.output_dir / SUMMARY_FILE, summary)
    what = "LoRA adapter" if lora_requested(run.args) else "pipeline folder"
    print(f"saved {what} {final_dir} ({summary['train_wall_time_s'] / 60:.1f} min)")
    write_sample_grid(run, model, FINAL_GRID)
    return final_dir


def check_hub_target(repo_id: str) -> None:
    """`--push-to-hub REPO`, checked before the first step rather than after the training: a repository id, the
    Hub not switched off, a token to upload with (read locally: no request is made)."""
    from huggingface_hub import constants, get_token

    if not looks_like_hub_repo_id(repo_id):
        raise ValueError(
            f"--push-to-hub {repo_id}: not a Hub repository id (owner/name: letters, digits, '-', '_', '.', at most "
            "96 characters, no '--' or '..')"
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        raise ValueError(f"--push-to-hub {repo_id}: the Hub is switched off (HF_HUB_OFFLINE); unset it to upload")
    if not get_token():
        raise ValueError(
            f"--push-to-hub {repo_id}: no Hugging Face token to upload with; run `hf auth login` or set HF_TOKEN"
        )


def push_to_hub(folder: Path, repo_id: str, private: bool = False, title: str = "TarFlow") -> str:
    """Upload the pipeline folder as it is (tarflow_hf.hub's upload path); returns the commit URL. A failure is an
    `UploadError` saying that the folder is kept, and where."""
    from ..hub import upload_folder

    try:
        info = upload_folder(folder, repo_id, private=private, commit_message=f"Upload {title} trained with tarflow-hf")
    except Exception as error:  # the Hub client's many errors: network, authorization, quota, ...
        reason = " ".join(str(error).split())[:200] or type(error).__name__
        raise UploadError(
            f"the upload to {repo_id} failed ({reason}); the trained model is kept in {folder}", folder
        ) from error
    return str(getattr(info, "commit_url", info))


__all__ = [
    "BUNDLED_MODEL_NAME",
    "NOT_RECIPE",
    "UploadError",
    "base_model_name",
    "build_recipe",
    "check_hub_target",
    "dataset_name",
    "push_to_hub",
    "save_final_outputs",
    "save_pipeline_folder",
    "start_outputs",
    "write_sample_grid",
]
