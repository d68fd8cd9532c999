"""Train or fine-tune a TarFlow model with 🤗 Accelerate.

Apple's recipe (`apple/ml-tarflow/train.py`): AdamW (betas 0.9/0.95, weight decay 1e-4), linear warm-up then a
cosine decay to 1e-6, Gaussian noise augmentation of the [-1, 1] images (or uniform dequantization), label
dropout for classifier-free guidance (a dropped label is -1, the mean class embedding), the model's own `loss`,
and for volume-preserving models (`--no-nvp`) a prior variance that tracks the latents' E[z^2] (Apple's
`update_prior`). On top of it: mixed precision, gradient accumulation and clipping, EMA weights, checkpoints that
resume exactly, periodic sample grids, JSON-lines metrics and trackers, and a pipeline folder with a model card at
the end.

Single process:

```bash
tarflow-hf train --dataset mnist --output-dir runs/mnist --hidden-size 128 --patch-size 4 --max-steps 2000
```

Several processes (the same command under `accelerate launch`; `--batch-size` is the global batch):

```bash
accelerate launch --num_processes 2 -m tarflow_hf.train --dataset mnist --output-dir runs/mnist
```

Fine-tune a pipeline folder, a Hub repository or the bundled model: `--init-from PATH_OR_REPO|bundled`. It keeps
the model's configuration (noise level, default guidance, label names; `--replace-labels` takes the new dataset's
class names when the class counts agree) and uses fine-tuning defaults (a learning rate of 1e-4, a warm-up of 10%
of the steps).

Fine-tune a STARFlow text-to-image pipeline (the family is read from the folder's model_index.json): the data is
captioned images (an image folder with `metadata.jsonl`, `file_name` + `text` columns, as datasets' `imagefolder`,
or a `datasets` dataset with `--caption-column`), trained in the VAE's latent space as Apple's `train.py` does:
`z = vae.encode(img).latent_dist.sample() * scaling_factor + noise_std * N(0, 1)`, captions through the pipeline's
`encode_prompt` (T5 frozen), a dropped caption is `""` (`--drop-label`), the model's loss. Only the transformer
trains; the output is the whole pipeline folder (text encoder, tokenizer and VAE unchanged):

```bash
tarflow-hf train --init-from starflow-3b --dataset captioned/ --output-dir runs/sf --batch-size 32 --max-steps 1000
accelerate launch --config_file fsdp.yaml -m tarflow_hf.train --init-from starflow-3b ...  # FSDP2, see README
```

The two families differ only in a small adapter (`TarFlowFamily`, `StarFlowFamily`: load, `encode_batch`,
`sample_grid`, `build_pipeline`); everything else (schedule, EMA, accumulation, clipping, checkpoints, resume,
grids, card) is shared.

What is written, and in which order: a checkpoint before a sample grid of the same step; the pipeline folder before
the final grid. A sample grid that fails is a warning; a non-finite loss stops the run with one line, keeping the
checkpoints written so far.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .commands.arguments import FINE_TUNE_LR, TRAIN_LR, TRAIN_NOISE_STD
from .commands.arguments import train as add_arguments
from .configuration_tarflow import TarFlowConfig
from .data import (
    EpochShuffleSampler,
    RelabeledDataset,
    check_dataset,
    dataset_summary,
    load_captioned_dataset,
    load_image_dataset,
)
from .fileio import atomic_file, atomic_folder, write_json_atomic
from .modeling_tarflow import TarFlowModel

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MODEL_SIZE_FLAGS = ("patch_size", "hidden_size", "num_blocks", "layers_per_block", "head_dim", "mlp_ratio")
NEW_MODEL_DEFAULTS = {"patch_size": 4, "hidden_size": 128, "num_blocks": 4, "layers_per_block": 2, "head_dim": 64}
# Apple's `Model.VAR_LR`: the momentum of the prior variance of volume-preserving models.
PRIOR_VARIANCE_MOMENTUM = 0.1
# The package each accelerate tracker needs (pip name).
TRACKER_PACKAGES = {"comet_ml": "comet-ml"}
# STARFlow sample grids: prompts taken from the dataset, images per prompt, caption width in characters.
SAMPLE_PROMPTS = 4
SAMPLE_IMAGES_PER_PROMPT = 2
SAMPLE_CAPTION_CHARS = 40
# Keys of the arguments that do not describe the recipe.
NOT_RECIPE = ("run", "command", "push_to_hub", "no_progress", "resume", "torch_threads")


class NonFiniteLossError(FloatingPointError, ValueError):
    """Training diverged (a non-finite loss or weights). A ValueError too, so the command line prints one line."""


# ------------------------------------------------------------------------------------------------ arguments
def _check_args(args: argparse.Namespace) -> None:
    """What argparse's types cannot check alone (they refuse nonsense numbers as they parse)."""
    if args.init_from and (args.config or any(getattr(args, f) is not None for f in MODEL_SIZE_FLAGS)):
        raise ValueError("--init-from keeps the pretrained architecture; drop --config and the model-size flags")
    if args.init_from and args.no_nvp:
        raise ValueError("--init-from keeps the pretrained architecture; drop --no-nvp")
    if args.replace_labels and not args.init_from:
        raise ValueError("--replace-labels only applies with --init-from")
    if args.stop_after_steps is not None and args.max_steps is not None and args.stop_after_steps > args.max_steps:
        raise ValueError(f"--stop-after-steps {args.stop_after_steps} is beyond --max-steps {args.max_steps}")


def use_cpu(requested: bool) -> bool:
    """CPU mode for Accelerator: when asked, or when launched as several processes (torchrun / accelerate
    launch) on a machine without CUDA, so that the processes join one gloo group instead of running alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return requested or (launched and not torch.cuda.is_available())


def resolve_trackers(report_to: str | None) -> list[str]:
    """The accelerate trackers `--report-to` names, each of them installed; else a ValueError naming the package to
    install (accelerate itself would silently drop a tracker whose package is missing)."""
    if report_to is None or report_to.strip().lower() in ("", "none"):
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = sorted(str(tracker) for tracker in get_available_trackers())
    names = [name.strip().lower() for name in report_to.split(",") if name.strip()]
    if "all" in names:
        if not available:
            raise ValueError("--report-to all: no tracker package is installed (pip install tensorboard, or wandb)")
        return available
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report-to {name}: unknown tracker; choose from {', '.join(LOGGER_TYPE_TO_CLASS)}")
        if name not in available:
            package = TRACKER_PACKAGES.get(name, name)
            raise ValueError(f"--report-to {name} needs the {package} package: pip install {package}")
    return list(dict.fromkeys(names))


def resolve_init_from(source: str) -> str:
    """What `--init-from` loads: 'bundled' is the package's MNIST model, an existing folder is itself, anything
    else must look like a Hub repo id (a missing local folder fails here, not after the Hub's retries)."""
    from .hub import hub_id

    if source == "bundled":
        from . import BUNDLED_MODEL

        if not Path(BUNDLED_MODEL).is_dir():
            raise FileNotFoundError(f"the bundled model is missing from this installation ({BUNDLED_MODEL})")
        return BUNDLED_MODEL
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser())
    if hub_id(source) is None:
        raise FileNotFoundError(
            f"--init-from {source}: no such pipeline folder, and not a Hub repo id (owner/name); "
            "'bundled' is the MNIST model shipped with tarflow-hf"
        )
    return source


# --------------------------------------------------------------------------------------------- recipe parts
def cosine_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """Apple's `CosineLRSchedule`: linear from min_lr to max_lr over the warm-up, then a cosine back to min_lr.
    `step` counts optimizer steps already taken (the rate for the next one)."""
    count = step + 1
    if count <= warmup_steps:
        return min_lr + count / warmup_steps * (max_lr - min_lr)
    progress = min(1.0, (count - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def add_noise(
    images: torch.Tensor, noise_type: str, noise_std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apple's input noise: `x + noise_std * N(0, 1)`, or uniform dequantization of the 256 pixel levels
    `((x + 1) * 127.5 + U[0, 1)) / 256 * 2 - 1`."""
    if noise_type == "gaussian":
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return images + noise_std * noise
    if noise_type == "uniform":
        levels = (images + 1) * (255 / 2)
        jitter = torch.rand(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        return (levels + jitter) / 256 * 2 - 1
    raise ValueError(f"noise_type must be 'gaussian' or 'uniform', got {noise_type!r}")


def drop_labels(labels: torch.Tensor, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by -1 (the unconditional branch) with `probability`, for classifier-free guidance."""
    if probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < probability
    return torch.where(drop, torch.full_like(labels, -1), labels)


@torch.no_grad()
def update_prior_variance(model: TarFlowModel, mean_square: torch.Tensor) -> None:
    """Apple's `update_prior` for volume-preserving models: the prior variance moves towards the latents'
    per-dimension E[z^2] (`mean_square`, shape (num_patches, patch_dim)) with momentum 0.1."""
    model.prior_variance.lerp_(mean_square.to(model.prior_variance), PRIOR_VARIANCE_MOMENTUM)


class EMA:
    """Exponential moving average of the parameters (buffers are copied), with the usual warm-up of the decay
    `min(decay, (1 + step) / (10 + step))` so early averages are not dominated by the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: p.detach().clone().float() for name, p in model.state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.shadow[name].lerp_(value.float(), 1 - decay)
            else:
                self.shadow[name].copy_(value)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


@dataclass
class Progress:
    """Position in the run, saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # data-loader batches (micro-batches) of `epoch` already consumed
    elapsed_seconds: float = 0.0


@dataclass
class TrainResult:
    """What `train` returns: the trained model (this process's copy), the EMA model, where things went."""

    model: Any  # TarFlowModel or StarFlowModel
    ema_model: Any
    progress: Progress
    pipeline_dir: Path | None


@dataclass
class Run:
    """Everything a training run holds, built by `train`'s setup steps and used by the loop."""

    args: argparse.Namespace  # with the defaults resolved (learning rate, warm-up, noise, ...)
    given: argparse.Namespace  # as the user gave them (the reproducing command)
    accelerator: Any
    output_dir: Path
    trackers: list[str]
    family: Any = None  # TarFlowFamily or StarFlowFamily
    dataset: Dataset | None = None
    raw_model: Any = None  # TarFlowModel or StarFlowModel
    model: Any = None  # the prepared (possibly wrapped) model
    forward: Any = None  # the model or its torch.compile
    optimizer: Any = None
    loader: Any = None
    ema: EMA | None = None
    generator: torch.Generator | None = None
    progress: Progress = field(default_factory=Progress)
    micro_batch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    base_license: str | None = None
    recipe: dict = field(default_factory=dict)
    bar: Any = None
    start_time: float = 0.0
    window: dict = field(default_factory=dict)
    prior_window: list = field(default_factory=list)
    last_metrics: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sample_guidance(self) -> float:
        """The sample grids' guidance: `--sample-guidance-scale`, else the model's default."""
        if self.args.sample_guidance_scale is not None:
            return self.args.sample_guidance_scale
        return float(self.raw_model.config.default_guidance_scale)


# ---------------------------------------------------------------------------------------------- model setup
def build_model(args: argparse.Namespace, class_names: list[str], num_channels: int, image_size: int) -> TarFlowModel:
    """A new model from the flags (and `--config`), or the `--init-from` model checked against the data."""
    num_classes = 0 if args.unconditional else len(class_names)
    if args.init_from:
        return load_base_model(args.init_from, num_classes, num_channels, image_size)
    settings = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read --config {args.config}: {error}") from error
        for key in ("architectures", "auto_map", "transformers_version", "model_type", "id2label", "label2id"):
            settings.pop(key, None)
    for name in MODEL_SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
        elif name in NEW_MODEL_DEFAULTS:
            settings.setdefault(name, NEW_MODEL_DEFAULTS[name])
    if args.no_nvp:
        settings["nvp"] = False
    settings.update(image_size=image_size, num_channels=num_channels, num_classes=num_classes)
    if num_classes:
        settings["id2label"] = dict(enumerate(class_names))
    return TarFlowModel(TarFlowConfig(**settings))


def load_base_model(source: str, num_classes: int, num_channels: int, image_size: int) -> TarFlowModel:
    """The transformer of the pipeline `--init-from` names (float32), which must fit the data."""
    from .pipeline_tarflow import TarFlowPipeline

    model = TarFlowPipeline.from_pretrained(resolve_init_from(source)).transformer.float()
    config = model.config
    if (config.num_channels, config.image_size) != (num_channels, image_size):
        raise ValueError(
            f"{source} expects {config.num_channels}x{config.image_size}x{config.image_size} images, "
            f"the data gives {num_channels}x{image_size}x{image_size}; set --image-size {config.image_size}"
        )
    if config.num_classes != num_classes:
        raise ValueError(
            f"{source} has num_classes={config.num_classes} but the dataset has {num_classes} classes; "
            "fine-tuning keeps the class embeddings, so the counts must match (use --unconditional for 0)"
        )
    return model


def base_model_license(source: str | None) -> str | None:
    """The license in the card of the model `--init-from` names (a local folder, or a Hub download already in
    the cache), so that fine-tuning keeps it; None when there is none to read."""
    if not source:
        return None
    from huggingface_hub import ModelCard, try_to_load_from_cache

    path = resolve_init_from(source)
    readme = Path(path, "README.md") if Path(path).is_dir() else try_to_load_from_cache(path, "README.md")
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # an unreadable card keeps the default license
        return None


def align_labels(
    model: TarFlowModel, dataset: Dataset, replace: bool, say: Any = print
) -> tuple[Dataset, dict[int, str] | None]:
    """Fine-tuning: the dataset's classes onto the model's label ids. Class names the model already has keep
    their ids (the dataset is relabelled when its order differs); otherwise `replace` takes the dataset's names
    (class i becomes id i). Returns the dataset to train on and, with `replace`, the id -> name table."""
    config = model.config
    new = list(getattr(dataset, "class_names", []))
    if not config.num_classes or not new:
        return dataset, None
    old = [str(config.id2label.get(i, i)) for i in range(config.num_classes)]
    if sorted(old) == sorted(new) and len(set(old)) == len(old):
        if old != new:
            dataset = RelabeledDataset(dataset, [old.index(name) for name in new], old)
        return dataset, (dict(enumerate(old)) if replace else None)
    if not replace:
        say("the model keeps its label names; dataset class i trains label id i (--replace-labels takes the data's)")
        return dataset, None
    config.id2label = dict(enumerate(new))
    config.label2id = {name: i for i, name in enumerate(new)}
    return dataset, dict(enumerate(new))


def label_table(id2label: dict[int, str]) -> str:
    return "label ids: " + ", ".join(f"{i} = {name}" for i, name in sorted(id2label.items()))


def resolve_model_defaults(args: argparse.Namespace, model: TarFlowModel) -> None:
    """The defaults that depend on the model: the noise level is the model's own when fine-tuning, and the
    config records the noise the weights are trained for (denoising and the model card read it); the default
    guidance is the model's own unless `--default-guidance-scale` is given."""
    if args.noise_std is None:
        args.noise_std = float(model.config.noise_std) if args.init_from else TRAIN_NOISE_STD
    model.config.noise_std = args.noise_std if args.noise_type == "gaussian" else 0.0
    if args.default_guidance_scale is not None:
        model.config.default_guidance_scale = args.default_guidance_scale
    if getattr(model.config, "num_classes", None) == 0 and args.drop_label:
        args.drop_label = 0.0  # nothing to drop for an unconditional model


# ------------------------------------------------------------------------------------------------- families
def pipeline_class_name(source: str) -> str | None:
    """The `_class_name` of `--init-from`'s model_index.json (a folder, or a Hub repo: the cache, else one request
    without retries), or None when it cannot be read."""
    path = resolve_init_from(source)
    index: Any = Path(path, "model_index.json")
    if not index.is_file():
        index = _hub_model_index(path)
    try:
        name = json.loads(index.read_text(encoding="utf-8") if isinstance(index, Path) else index).get("_class_name")
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if not name and Path(path, "transformer", "config.json").is_file():  # a folder without an index: the model
        model_type = json.loads(Path(path, "transformer", "config.json").read_text()).get("model_type")
        name = "StarFlowPipeline" if model_type == "starflow" else None
    return name[-1] if isinstance(name, list) and name else name


def _hub_model_index(repo_id: str) -> Any:
    from huggingface_hub import hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers, get_session

    cached = try_to_load_from_cache(repo_id, "model_index.json")
    if isinstance(cached, str):
        return Path(cached)
    try:
        response = get_session().get(hf_hub_url(repo_id, "model_index.json"), headers=build_hf_headers(), timeout=10)
        return response.text if response.status_code == 200 else None
    except Exception:  # offline: the TarFlow loader reports what is wrong
        return None


def family_for(init_from: str | None) -> Any:
    """The adapter of the model family `--init-from` names: STARFlow for a StarFlowPipeline, else TarFlow."""
    if init_from and pipeline_class_name(init_from) == "StarFlowPipeline":
        return StarFlowFamily()
    return TarFlowFamily()


class TarFlowFamily:
    """TarFlow: class-conditional (or unconditional) images in pixel space; labels dropped to -1."""

    title = "TarFlow"

    def check_args(self, args: argparse.Namespace) -> None:
        pass

    def load(self, run: Run) -> None:
        """The model to train (new, or `--init-from`'s with its labels aligned) and the defaults it decides."""
        args = run.args
        dataset, num_channels, image_size = load_training_data(args)
        class_names = list(getattr(dataset, "class_names", []))
        model = build_model(args, class_names, num_channels, image_size)
        if args.init_from:
            dataset, table = align_labels(model, dataset, args.replace_labels, say=run.accelerator.print)
            if table is not None:
                run.accelerator.print(label_table(table))
            run.base_license = base_model_license(args.init_from)
        resolve_model_defaults(args, model)
        run.dataset, run.raw_model = dataset, model

    def encode_batch(self, run: Run, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(noisy images, labels with dropout, or None for an unconditional model)."""
        images, labels = batch
        args = run.args
        inputs = add_noise(images, args.noise_type, args.noise_std, run.generator)
        labels = drop_labels(labels, args.drop_label, run.generator) if run.raw_model.config.num_classes else None
        return inputs, labels

    def sample_grid(self, run: Run, model: TarFlowModel):
        return render_sample_grid(model, run.sample_guidance, run.args.seed)

    def build_pipeline(self, model: TarFlowModel):
        from .pipeline_tarflow import TarFlowPipeline

        return TarFlowPipeline(transformer=model)


def drop_captions(captions: list[str], probability: float, generator: torch.Generator | None = None) -> list[str]:
    """Replace each caption by the empty prompt "" with `probability` (Apple's `drop_label` for text)."""
    if probability <= 0:
        return list(captions)
    device = generator.device if generator is not None else "cpu"
    drop = torch.rand(len(captions), generator=generator, device=device) < probability
    return ["" if dropped else caption for caption, dropped in zip(captions, drop.tolist(), strict=True)]


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apple's training latents: `vae.encode(img).latent_dist.sample() * scaling_factor` (less the VAE's
    `shift_factor`, if it has one), float32; `images` in [-1, 1]."""
    pixels = images.to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(pixels).latent_dist.sample(generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


class StarFlowFamily:
    """STARFlow: captioned images, trained in the VAE's latent space with the frozen T5's embeddings; only the
    transformer trains, the pipeline's other components are kept (and saved) as loaded."""

    title = "STARFlow"

    def __init__(self) -> None:
        self.pipe: Any = None  # the loaded pipeline: frozen text encoder, tokenizer, VAE
        self.prompts: list[str] = []  # the sample grids' prompts, from the dataset

    def check_args(self, args: argparse.Namespace) -> None:
        for flag, given in (
            ("--unconditional", args.unconditional),
            ("--replace-labels", args.replace_labels),
            ("--noise-type uniform", args.noise_type == "uniform"),
        ):
            if given:
                raise ValueError(f"{flag} does not apply to a STARFlow model (text-to-image, Gaussian latent noise)")

    def load(self, run: Run) -> None:
        from .pipeline_starflow import StarFlowPipeline

        args, device = run.args, run.accelerator.device
        # The data first (a mistake there is found before a large model loads), then sized to the model.
        dataset = load_captioned_dataset(args.dataset, args.split, None, args.image_column, args.caption_column)
        pipe = StarFlowPipeline.from_pretrained(resolve_init_from(args.init_from))
        pipe.set_progress_bar_config(disable=True)
        for frozen in (pipe.text_encoder, pipe.vae):
            frozen.requires_grad_(False).eval().to(device)
        model = pipe.transformer.float()
        dataset.image_size = args.image_size or model.config.sample_size * pipe.vae_scale_factor
        check_dataset(dataset)
        self.prompts = pick_prompts(dataset)
        self.pipe = pipe
        run.base_license = base_model_license(args.init_from)
        resolve_model_defaults(args, model)
        run.dataset, run.raw_model = dataset, model

    def encode_batch(self, run: Run, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, text embeddings): captions dropped to "" with `--drop-label`, encoded by the pipeline's
        `encode_prompt`; latents sampled from the VAE posterior plus `noise_std` Gaussian noise (Apple's train.py)."""
        images, captions = batch
        args, device = run.args, run.accelerator.device
        captions = drop_captions(list(captions), args.drop_label, run.generator)
        embeds, _ = self.pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        latents = encode_latents(self.pipe.vae, images, run.generator)
        return add_noise(latents, "gaussian", args.noise_std, run.generator), embeds

    def sample_grid(self, run: Run, model: Any):
        """One row per prompt (SAMPLE_IMAGES_PER_PROMPT images, one seed each), the prompt under its first image."""
        from .grids import make_grid

        pipe = self.build_pipeline(model)
        per = SAMPLE_IMAGES_PER_PROMPT
        generators = [torch.Generator().manual_seed(run.args.seed + i) for i in range(len(self.prompts) * per)]
        was_training = model.training
        model.eval()
        try:
            images = pipe(
                self.prompts, num_images_per_prompt=per, guidance_scale=run.sample_guidance, generator=generators
            ).images
        finally:
            model.train(was_training)
        captions = [textwrap.shorten(p, SAMPLE_CAPTION_CHARS) for p in self.prompts]
        return make_grid(images, per, [captions[i // per] if i % per == 0 else "" for i in range(len(images))])

    def build_pipeline(self, model: Any):
        from .pipeline_starflow import StarFlowPipeline

        pipe = StarFlowPipeline(
            transformer=model, text_encoder=self.pipe.text_encoder, tokenizer=self.pipe.tokenizer, vae=self.pipe.vae
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def pick_prompts(dataset: Any, count: int = SAMPLE_PROMPTS) -> list[str]:
    """Up to `count` distinct non-empty captions spread over the dataset, for the sample grids."""
    prompts: list[str] = []
    step = max(1, len(dataset) // (count * 4))
    for index in range(0, len(dataset), step):
        caption = dataset.caption(index).strip()
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == count:
            break
    return prompts or ["a photo"]


# -------------------------------------------------------------------------------------------- checkpointing
def list_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(path.name)
    return int(match.group(1)) if match else -1


def resolve_resume(resume: str, output_dir: Path) -> list[Path]:
    """The checkpoints `--resume` may load, in order of preference: for 'latest' every checkpoint, newest first
    (a damaged one falls back to the next); else the folder given."""
    if resume == "latest":
        return list_checkpoints(output_dir)[::-1]
    path = Path(resume)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no progress.json); or use 'latest'")
    return [path]


def move_later_checkpoints_aside(output_dir: Path, step: int) -> list[Path]:
    """Resuming from step `step` starts a new branch: checkpoints of later steps (the old branch, or damaged
    ones) are renamed `checkpoint-N.superseded[-k]`, not deleted, so that `latest` and the rotation see only
    this branch. Returns the new names."""
    moved = []
    for path in list_checkpoints(output_dir):
        if checkpoint_step(path) > step:
            target, k = path.with_name(f"{path.name}.superseded"), 1
            while target.exists():
                k += 1
                target = path.with_name(f"{path.name}.superseded-{k}")
            path.rename(target)
            moved.append(target)
    return moved


def save_checkpoint(accelerator, output_dir: Path, progress: Progress, ema: EMA | None, generator, keep: int) -> Path:
    """accelerator.save_state into a temporary folder, then one rename: a crash never leaves a half checkpoint
    under a real name. Our own state (position, EMA, noise generator) goes in safetensors/json. The main process
    owns the temporary folder (see `fileio.atomic_folder`) and tells the others its name."""
    from accelerate.utils import broadcast_object_list
    from safetensors.torch import save_file

    final = output_dir / "checkpoints" / f"checkpoint-{progress.step}"
    main = accelerator.is_main_process
    # A checkpoint of the same step (a rerun from an earlier one) is replaced.
    owner = atomic_folder(final, overwrite=True) if main else contextlib.nullcontext()
    with owner as staging:
        staging = Path(broadcast_object_list([str(staging) if main else None])[0])
        accelerator.save_state(str(staging), safe_serialization=True)
        ema_state = {k: _full(v).contiguous() for k, v in ema.shadow.items()} if ema is not None else None
        rank = accelerator.process_index
        save_file({"state": generator.get_state()}, str(staging / f"generator_{rank}.safetensors"))
        accelerator.wait_for_everyone()
        if main:
            if ema_state is not None:
                save_file(
                    ema_state,
                    str(staging / "ema.safetensors"),
                    metadata={"num_updates": str(ema.num_updates)},
                )
            (staging / "progress.json").write_text(json.dumps(progress.__dict__, indent=2))
    if main:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path, ema: EMA | None, generator) -> Progress:
    """Load a checkpoint into the prepared objects; any damage (a truncated or missing file) raises."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    progress = Progress(**json.loads((path / "progress.json").read_text()))
    generator_file = path / f"generator_{accelerator.process_index}.safetensors"
    if not generator_file.is_file():
        raise ValueError(f"{path} was written by a run with a different number of processes ({generator_file} missing)")
    if ema is not None and not (path / "ema.safetensors").is_file():
        raise ValueError(f"{path} has no EMA weights; resume with the same --ema-decay as the original run")
    accelerator.load_state(str(path))
    generator.set_state(load_file(str(generator_file))["state"])
    if ema is not None:
        ema_file = path / "ema.safetensors"
        ema.shadow = {k: _shard_like(v.float(), ema.shadow[k]) for k, v in load_file(str(ema_file)).items()}
        with safe_open(str(ema_file), framework="pt") as handle:
            ema.num_updates = int(handle.metadata()["num_updates"])
    return progress


def _shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` placed as `like`: sharded the same way under FSDP2 (DTensor), else on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements)
    return tensor.to(like.device)


def resume_training(run: Run) -> None:
    """`--resume`: load the chosen checkpoint (for 'latest', the newest intact one: a damaged one is a warning and
    the next older is tried), then move later checkpoints aside (see `move_later_checkpoints_aside`)."""
    args, accelerator = run.args, run.accelerator
    if not args.resume:
        return
    candidates = resolve_resume(args.resume, run.output_dir)
    errors = []
    for checkpoint in candidates:
        try:
            run.progress = load_checkpoint(accelerator, checkpoint, run.ema, run.generator)
        except Exception as error:
            if args.resume != "latest":
                raise ValueError(f"--resume {checkpoint}: cannot load this checkpoint ({error})") from error
            errors.append(f"{checkpoint.name}: {error}")
            if run.is_main:
                logger.warning("checkpoint %s is damaged (%s); trying the one before it", checkpoint, error)
            continue
        accelerator.print(f"resumed from {checkpoint} at step {run.progress.step}")
        if run.is_main:
            for moved in move_later_checkpoints_aside(run.output_dir, run.progress.step):
                print(f"moved a later checkpoint aside: {moved}")
        accelerator.wait_for_everyone()
        return
    if candidates:
        raise ValueError(f"--resume latest: no checkpoint in {run.output_dir / 'checkpoints'} loads ({errors[0]})")
    accelerator.print(f"--resume latest: no checkpoint in {run.output_dir / 'checkpoints'}, starting fresh")


def checkpoint_now(run: Run) -> Path:
    """A checkpoint of the current step, unless the weights are no longer finite (then the last good one stays)."""
    local = (p.to_local() if hasattr(p, "to_local") else p for p in run.raw_model.parameters())  # FSDP2: own shard
    if not all(torch.isfinite(p).all() for p in local):
        raise NonFiniteLossError(f"non-finite weights at step {run.progress.step}: {diverged_advice(run)}")
    run.progress.elapsed_seconds = time.time() - run.start_time
    args = run.args
    return save_checkpoint(run.accelerator, run.output_dir, run.progress, run.ema, run.generator, args.keep_checkpoints)


def diverged_advice(run: Run) -> str:
    checkpoints = list_checkpoints(run.output_dir)
    kept = (
        f"the last good checkpoint is {checkpoints[-1]} (--resume it)" if checkpoints else "no checkpoint was written"
    )
    return f"training stopped, {kept}; lower --lr (now {run.args.lr:g}) or --max-grad-norm"


# ------------------------------------------------------------------------------------------------- outputs
def render_sample_grid(model: TarFlowModel, guidance_scale: float, seed: int, per_class: int = 8):
    """A PIL grid of samples drawn by the pipeline (the one generation path: sample, denoise, quantize), one row per
    class (at most 10, the class name under the row's first image), or 4 rows for an unconditional model."""
    from .grids import make_grid
    from .pipeline_tarflow import TarFlowPipeline

    config = model.config
    rows = min(config.num_classes, 10) if config.num_classes else 4
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows * per_class, config.num_patches, config.patch_dim, generator=generator)
    labels = torch.arange(rows).repeat_interleave(per_class) if config.num_classes else None
    pipe = TarFlowPipeline(transformer=model)
    pipe.set_progress_bar_config(disable=True)
    was_training = model.training
    model.eval()
    try:
        tiles = pipe(
            class_labels=labels, latents=latents, guidance_scale=guidance_scale if labels is not None else 1.0
        ).images
    finally:
        model.train(was_training)
    captions = None
    if labels is not None:
        captions = [
            str(config.id2label.get(i // per_class, "")) if i % per_class == 0 else "" for i in range(len(tiles))
        ]
    return make_grid(tiles, per_class, captions)


def write_sample_grid(run: Run, model: TarFlowModel, name: str) -> None:
    """The main process's sample grid `samples/{name}.png` at the model's (or --sample-guidance-scale) guidance,
    also sent to the trackers. Never stops training: a failure is a warning."""
    if not run.is_main:
        return
    path = run.output_dir / "samples" / f"{name}.png"
    try:
        grid = run.family.sample_grid(run, model)
        with atomic_file(path) as staging:
            grid.save(staging, format="PNG")
        log_images(run, grid)
    except Exception as error:
        logger.warning("sample grid %s failed, training goes on: %s: %s", path, type(error).__name__, error)


def log_images(run: Run, grid) -> None:
    """A sample grid to every tracker that takes images, at the current step."""
    import numpy as np

    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": np.asarray(grid)[None]}, step=run.progress.step, dataformats="NHWC")
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"samples": [grid]}, step=run.progress.step)


def dataset_name(dataset: str) -> str:
    """How a card names the dataset: a local folder by its folder name, anything else (mnist, a Hub dataset id)
    as given."""
    path = Path(dataset).expanduser()
    return path.resolve().name if path.exists() else dataset


def save_pipeline_folder(
    pipe: Any,
    target: Path,
    args: argparse.Namespace,
    recipe: dict,
    summary: dict,
    command: str,
    license: str | None = None,
) -> Path:
    """The final pipeline folder (replacing the one an earlier run of this output directory wrote), with a model card
    (tarflow_hf.hub) holding the recipe, the command and the last training metrics. The card names the Hub
    repository when the run pushes there, else the folder; fine-tuning names the base model when it is a Hub id
    and keeps its license unless `--license` is given. `pipe` is the family's pipeline around the trained model,
    saved with its own `save_pretrained`."""
    from .hub import TrainingInfo, hub_id, model_card

    card = model_card(
        pipe,
        repo_id=args.push_to_hub or str(target),
        license=getattr(args, "license", None) or license,
        datasets=[dataset_name(args.dataset)],
        base_model=hub_id(args.init_from),  # the Hub's base_model names repositories, not local folders
        training=TrainingInfo(recipe=recipe, command=command, metrics=summary),
    )
    with atomic_folder(target, overwrite=True) as staging:
        pipe.save_pretrained(staging, model_card=card, overwrite_model_card=True)
    return target


def push_to_hub(folder: Path, repo_id: str, private: bool = False, title: str = "TarFlow") -> str:
    """Upload the pipeline folder as it is (tarflow_hf.hub's upload path); returns the commit URL."""
    from .hub import upload_folder

    info = upload_folder(folder, repo_id, private=private, commit_message=f"Upload {title} trained with tarflow-hf")
    return str(getattr(info, "commit_url", info))


def format_command(args: argparse.Namespace) -> str:
    """The `tarflow-hf train` command line that reproduces `args` (options that differ from their defaults)."""
    import shlex

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parts = ["tarflow-hf", "train"]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.dest not in vars(args):
            continue
        value = getattr(args, action.dest)
        if action.dest == "drop_label" and value == 0 and action.default != 0:
            continue  # zeroed for an unconditional model, not asked for
        if value == action.default:
            continue
        flag = action.option_strings[0]
        parts += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a DTensor; every process must call this), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def _ema_model(model: Any, ema: EMA | None) -> Any:
    """An unsharded copy of `model` holding the EMA weights (without EMA the model itself, or under FSDP2 its
    gathered copy). Every process calls it: gathering shards is collective."""
    if ema is None and not _is_sharded(model):
        return model
    state = ema.shadow if ema is not None else model.state_dict()
    state = {name: _full(value) for name, value in state.items()}
    with torch.device("meta"):  # no initialisation: every weight is loaded below
        copy = type(model)(type(model.config).from_dict(model.config.to_dict()))
    copy.to_empty(device=model.device)
    dtypes = {name: value.dtype for name, value in copy.state_dict().items()}
    copy.load_state_dict({name: value.to(dtypes[name]) for name, value in state.items()})
    copy.eval()
    return copy


# --------------------------------------------------------------------------------------------- setup steps
def start_accelerator(args: argparse.Namespace, trackers: list[str]):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    accelerator = Accelerator(
        cpu=use_cpu(args.cpu),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(args.output_dir),
    )
    world = accelerator.num_processes * args.gradient_accumulation_steps
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {world}"
        )
    set_seed(args.seed)  # same initial weights on every process
    return accelerator


def load_training_data(args: argparse.Namespace) -> tuple[Dataset, int, int]:
    """The dataset, checked before any step (every image of a folder opened once), and its channels and size."""
    dataset = load_image_dataset(
        args.dataset, args.split, args.image_size, data_dir=args.data_dir, image_column=args.image_column
    )
    check_dataset(dataset)
    image, _ = dataset[0]
    if image.shape[-1] != image.shape[-2]:
        raise ValueError(f"images must be square; got {tuple(image.shape[1:])}, pass --image-size")
    return dataset, image.shape[0], image.shape[-1]


def init_model(run: Run) -> None:
    """The model to train, its data and the defaults it decides, as its family does it."""
    run.family.load(run)
    if run.args.gradient_checkpointing:
        run.raw_model.gradient_checkpointing_enable()
    run.raw_model.train()


def prepare_training(run: Run) -> None:
    """Data loader, schedule lengths, optimizer, EMA and noise generator, prepared by accelerate."""
    args, accelerator = run.args, run.accelerator
    run.micro_batch = args.batch_size // (accelerator.num_processes * args.gradient_accumulation_steps)
    sampler = EpochShuffleSampler(len(run.dataset), seed=args.seed)
    loader = DataLoader(
        run.dataset, batch_size=run.micro_batch, sampler=sampler, drop_last=True, num_workers=args.num_workers
    )
    steps_per_epoch = len(loader) // accelerator.num_processes // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{dataset_summary(run.dataset)} is less than one batch of {args.batch_size}")
    run.total_steps = args.max_steps or args.epochs * steps_per_epoch
    if args.warmup_steps is not None:
        run.warmup_steps = args.warmup_steps
    elif args.init_from:
        run.warmup_steps = max(1, run.total_steps // 10)
    else:
        run.warmup_steps = min(steps_per_epoch, max(1, run.total_steps // 10))
    optimizer = torch.optim.AdamW(
        run.raw_model.parameters(),
        lr=args.min_lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
    )
    run.model, run.optimizer, run.loader = accelerator.prepare(run.raw_model, optimizer, loader)
    run.raw_model = accelerator.unwrap_model(run.model)
    run.forward = torch.compile(run.model) if args.compile else run.model
    run.ema = EMA(run.raw_model, args.ema_decay) if args.ema_decay > 0 else None
    # Our own generator for noise and label dropout: its state is checkpointed, so resuming continues the
    # same random stream whatever the data loader or other code drew from the global generators.
    run.generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)


def start_outputs(run: Run) -> None:
    """recipe.json, the trackers, the progress bar and the one-line summary of the run."""
    args, accelerator = run.args, run.accelerator
    run.recipe = {key: value for key, value in vars(args).items() if key not in NOT_RECIPE}
    run.recipe.update(
        num_processes=accelerator.num_processes, total_steps=run.total_steps, warmup_steps=run.warmup_steps
    )
    if run.is_main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.output_dir / "recipe.json", run.recipe, sort_keys=True)
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


# ------------------------------------------------------------------------------------------------ the loop
def check_finite_loss(run: Run, loss: torch.Tensor, lr: float) -> None:
    """Stop at a non-finite loss (every process agrees, so none is left waiting), keeping the checkpoints."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if run.accelerator.num_processes > 1:
        bad = run.accelerator.reduce(bad, reduction="sum")
    if bad.item():
        raise NonFiniteLossError(
            f"non-finite loss at step {run.progress.step + 1} (learning rate {lr:.3g}): {diverged_advice(run)}"
        )


def training_step(run: Run, batch: Any) -> None:
    """One micro-batch: the family's inputs (noise, label or caption dropout), forward, backward, and the optimizer
    step when accumulation is done."""
    args, accelerator = run.args, run.accelerator
    lr = cosine_lr(run.progress.step, run.total_steps, run.warmup_steps, args.lr, args.min_lr)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    inputs, condition = run.family.encode_batch(run, batch)
    with accelerator.accumulate(run.model):
        output = run.forward(inputs, condition)
        check_finite_loss(run, output.loss, lr)
        if not getattr(run.raw_model.config, "nvp", True):
            run.prior_window.append(output.latents.detach().float().square().mean(dim=0))
        accelerator.backward(output.loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    window = run.window
    window["loss"] = window.get("loss", 0.0) + output.loss.detach()
    window["bpd"] = window.get("bpd", 0.0) + output.bits_per_dim.detach().mean()
    window["count"] = window.get("count", 0) + 1
    window["lr"] = lr


def update_prior(run: Run) -> None:
    """Volume-preserving models, after each optimizer step: Apple's prior update from E[z^2] over the step's
    batch (every micro-batch and process)."""
    if not run.prior_window:
        return
    mean_square = torch.stack(run.prior_window).mean(dim=0)
    run.prior_window.clear()
    if run.accelerator.num_processes > 1:
        mean_square = run.accelerator.reduce(mean_square, reduction="mean")
    update_prior_variance(run.raw_model, mean_square)


def log_metrics(run: Run) -> None:
    """The window's mean loss and bits/dim (over processes) to metrics.jsonl, the bar and the trackers."""
    window, accelerator = run.window, run.accelerator
    stats = torch.stack([window["loss"] / window["count"], window["bpd"] / window["count"]]).float()
    stats = accelerator.reduce(stats, reduction="mean")
    run.last_metrics = {
        "step": run.progress.step,
        "epoch": run.progress.epoch,
        "lr": window["lr"],
        "loss": stats[0].item(),
        "bits_per_dim": stats[1].item(),
        "elapsed_s": round(time.time() - run.start_time, 1),
    }
    run.window = {}
    if run.bar is not None:
        run.bar.set_postfix(loss=f"{run.last_metrics['loss']:.4f}", bpd=f"{run.last_metrics['bits_per_dim']:.3f}")
    if run.is_main:
        with (run.output_dir / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(run.last_metrics) + "\n")
    if run.trackers:
        accelerator.log({k: v for k, v in run.last_metrics.items() if k != "step"}, step=run.progress.step)


def after_optimizer_step(run: Run) -> None:
    """Prior, EMA, bar, then what is due at this step: metrics, checkpoint, and last the sample grid."""
    args, progress = run.args, run.progress
    progress.step += 1
    update_prior(run)
    if run.ema is not None:
        run.ema.update(run.raw_model)
    if run.bar is not None:
        run.bar.update(1)
    if progress.step % args.log_every == 0 or progress.step == run.total_steps:
        log_metrics(run)
    if args.checkpoint_every and progress.step % args.checkpoint_every == 0:
        checkpoint_now(run)
    if args.sample_every and progress.step % args.sample_every == 0:
        write_sample_grid(run, _ema_model(run.raw_model, run.ema), f"step_{progress.step:07d}")


def run_epochs(run: Run) -> None:
    """Epochs until the last step or `--stop-after-steps`, continuing mid-epoch after a resume."""
    args, progress, accelerator = run.args, run.progress, run.accelerator
    run.start_time = time.time() - progress.elapsed_seconds
    while progress.step < run.total_steps and progress.step != args.stop_after_steps:
        run.loader.set_epoch(progress.epoch)
        epoch_loader = run.loader
        if progress.batches_in_epoch:
            epoch_loader = accelerator.skip_first_batches(run.loader, progress.batches_in_epoch)
        for batch in epoch_loader:
            progress.batches_in_epoch += 1
            training_step(run, batch)
            if not accelerator.sync_gradients:
                continue
            after_optimizer_step(run)
            if progress.step >= run.total_steps or progress.step == args.stop_after_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
    if run.bar is not None:
        run.bar.close()


def finish(run: Run) -> TrainResult:
    """Stopped early: a checkpoint to resume from. Done: the pipeline folder with its card, the summary, the
    final sample grid (after the folder: a failing grid costs nothing), and the upload."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    wall = time.time() - run.start_time
    accelerator.wait_for_everyone()
    if progress.step < run.total_steps:
        checkpoint = checkpoint_now(run)
        accelerator.print(f"stopped at step {progress.step} of {run.total_steps}; resume with --resume {checkpoint}")
        return TrainResult(run.raw_model, _ema_model(run.raw_model, run.ema), progress, None)
    final_dir = run.output_dir / "model"
    final_model = _ema_model(run.raw_model, run.ema)
    if run.is_main:
        summary = {**run.last_metrics, "train_wall_time_s": round(wall, 1), "ema": run.ema is not None}
        command = format_command(run.given)
        pipe = run.family.build_pipeline(final_model)
        save_pipeline_folder(pipe, final_dir, args, run.recipe, summary, command, run.base_license)
        write_json_atomic(run.output_dir / "train_summary.json", summary)
        print(f"saved pipeline folder {final_dir} ({wall / 60:.1f} min)")
        write_sample_grid(run, final_model, "final")
        if args.push_to_hub:
            url = push_to_hub(final_dir, args.push_to_hub, private=args.hub_private, title=run.family.title)
            print(f"pushed to {url}")
    if run.trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(run.raw_model, final_model, progress, final_dir)


# ---------------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> TrainResult:
    """Run training as described by `args` (see `add_arguments`)."""
    _check_args(args)
    family = family_for(args.init_from)
    family.check_args(args)
    resolved = argparse.Namespace(**vars(args))
    if resolved.lr is None:
        resolved.lr = FINE_TUNE_LR if args.init_from else TRAIN_LR
    if resolved.min_lr > resolved.lr:
        raise ValueError(f"--min-lr {resolved.min_lr} is above the learning rate {resolved.lr}")
    trackers = resolve_trackers(args.report_to)
    accelerator = start_accelerator(resolved, trackers)
    run = Run(args=resolved, given=args, accelerator=accelerator, output_dir=Path(args.output_dir), trackers=trackers)
    run.family = family
    init_model(run)
    prepare_training(run)
    resume_training(run)
    start_outputs(run)
    run_epochs(run)
    return finish(run)
