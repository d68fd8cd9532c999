"""Train or fine-tune a TarFlow model with 🤗 Accelerate.

Apple's recipe (`apple/ml-tarflow/train.py`): AdamW (betas 0.9/0.95, weight decay 1e-4), linear warm-up then a
cosine decay to 1e-6, Gaussian noise augmentation of the [-1, 1] images (or uniform dequantization), label
dropout for classifier-free guidance (a dropped label is -1, the mean class embedding), and the model's own
`loss`. On top of it: mixed precision, gradient accumulation and clipping, EMA weights, checkpoints that resume
exactly, periodic sample grids and JSON-lines metrics, and a pipeline folder with a model card at the end.

Single process:

```bash
tarflow-hf train --dataset mnist --output-dir runs/mnist --hidden-size 128 --patch-size 4 --max-steps 2000
```

Several processes (the same command under `accelerate launch`; `--batch-size` is the global batch):

```bash
accelerate launch --num_processes 2 -m tarflow_hf.train --dataset mnist --output-dir runs/mnist
```

Fine-tune a pipeline folder or Hub repository: `--init-from PATH_OR_REPO` (keeps its config and label table;
`--replace-labels` takes the new dataset's class names when the class counts agree).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .arguments import train as add_arguments
from .configuration_tarflow import TarFlowConfig
from .data import EpochShuffleSampler, dataset_summary, load_image_dataset
from .fileio import atomic_file, atomic_folder, write_json_atomic
from .modeling_tarflow import TarFlowModel

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MODEL_SIZE_FLAGS = ("patch_size", "hidden_size", "num_blocks", "layers_per_block", "head_dim", "mlp_ratio")


# ------------------------------------------------------------------------------------------------ arguments
def _check_args(args: argparse.Namespace) -> None:
    positive = ("batch_size", "gradient_accumulation_steps", "epochs")
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if not 0 <= args.drop_label < 1:
        raise ValueError(f"--drop-label must be in [0, 1), got {args.drop_label}")
    if not 0 <= args.ema_decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1) (0 disables EMA), got {args.ema_decay}")
    if args.noise_std < 0:
        raise ValueError(f"--noise-std must be >= 0, got {args.noise_std}")
    if args.lr <= 0 or args.min_lr < 0 or args.min_lr > args.lr:
        raise ValueError(f"need 0 <= --min-lr <= --lr and --lr > 0, got lr={args.lr} min_lr={args.min_lr}")
    if args.keep_checkpoints < 1:
        raise ValueError(f"--keep-checkpoints must be >= 1, got {args.keep_checkpoints}")
    if args.init_from and (args.config or any(getattr(args, f) is not None for f in MODEL_SIZE_FLAGS)):
        raise ValueError("--init-from keeps the pretrained architecture; drop --config and the model-size flags")


def use_cpu(requested: bool) -> bool:
    """CPU mode for Accelerator: when asked, or when launched as several processes (torchrun / accelerate
    launch) on a machine without CUDA, so that the processes join one gloo group instead of running alone."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) != -1
    return requested or (launched and not torch.cuda.is_available())


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
class TrainResult:
    """What `train` returns: the trained model (this process's copy), the EMA model, where things went."""

    model: TarFlowModel
    ema_model: TarFlowModel
    progress: Progress
    pipeline_dir: Path | None


@dataclass
class Progress:
    """Position in the run, saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # data-loader batches (micro-batches) of `epoch` already consumed
    elapsed_seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- model setup
def build_model(args: argparse.Namespace, class_names: list[str], num_channels: int, image_size: int) -> TarFlowModel:
    num_classes = 0 if args.unconditional else len(class_names)
    if args.init_from:
        from .pipeline_tarflow import TarFlowPipeline

        model = TarFlowPipeline.from_pretrained(args.init_from).transformer
        model = model.float()
        config = model.config
        if (config.num_channels, config.image_size) != (num_channels, image_size):
            raise ValueError(
                f"{args.init_from} expects {config.num_channels}x{config.image_size}x{config.image_size} images, "
                f"the data gives {num_channels}x{image_size}x{image_size}; set --image-size {config.image_size}"
            )
        if config.num_classes != num_classes:
            raise ValueError(
                f"{args.init_from} has num_classes={config.num_classes} but the dataset has {num_classes} classes; "
                "fine-tuning keeps the class embeddings, so the counts must match (use --unconditional for 0)"
            )
        if args.replace_labels and num_classes:
            config.id2label = dict(enumerate(class_names))
            config.label2id = {name: i for i, name in enumerate(class_names)}
        return model
    if args.replace_labels:
        raise ValueError("--replace-labels only applies with --init-from")
    settings = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read --config {args.config}: {error}") from error
        for key in ("architectures", "auto_map", "transformers_version", "model_type", "id2label", "label2id"):
            settings.pop(key, None)
    defaults = {"patch_size": 4, "hidden_size": 128, "num_blocks": 4, "layers_per_block": 2, "head_dim": 64}
    for name in MODEL_SIZE_FLAGS:
        value = getattr(args, name)
        if value is not None:
            settings[name] = value
        elif name in defaults:
            settings.setdefault(name, defaults[name])
    if args.no_nvp:
        settings["nvp"] = False
    settings.update(image_size=image_size, num_channels=num_channels, num_classes=num_classes)
    if num_classes:
        settings["id2label"] = dict(enumerate(class_names))
    return TarFlowModel(TarFlowConfig(**settings))


# -------------------------------------------------------------------------------------------- checkpointing
def list_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / "progress.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (no progress.json); or use 'latest'")
    return path


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
        rank = accelerator.process_index
        save_file({"state": generator.get_state()}, str(staging / f"generator_{rank}.safetensors"))
        accelerator.wait_for_everyone()
        if main:
            if ema is not None:
                save_file(
                    {k: v.contiguous() for k, v in ema.shadow.items()},
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
    from safetensors import safe_open
    from safetensors.torch import load_file

    accelerator.load_state(str(path))
    progress = Progress(**json.loads((path / "progress.json").read_text()))
    generator_file = path / f"generator_{accelerator.process_index}.safetensors"
    if not generator_file.is_file():
        raise ValueError(f"{path} was written by a run with a different number of processes ({generator_file} missing)")
    generator.set_state(load_file(str(generator_file))["state"])
    if ema is not None:
        ema_file = path / "ema.safetensors"
        if not ema_file.is_file():
            raise ValueError(f"{path} has no EMA weights; resume with the same --ema-decay as the original run")
        ema.shadow = {k: v.float() for k, v in load_file(str(ema_file)).items()}
        with safe_open(str(ema_file), framework="pt") as handle:
            ema.num_updates = int(handle.metadata()["num_updates"])
    return progress


# ------------------------------------------------------------------------------------------------- outputs
def save_sample_grid(model: TarFlowModel, path: Path, guidance_scale: float, seed: int, per_class: int = 8) -> None:
    """A grid of samples, one row per class (at most 10 classes), written atomically as PNG."""
    from PIL import Image

    config = model.config
    rows = min(config.num_classes, 10) if config.num_classes else 4
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(rows * per_class, config.num_patches, config.patch_dim, generator=generator)
    labels = torch.arange(rows).repeat_interleave(per_class) if config.num_classes else None
    was_training = model.training
    model.eval()
    images = model.inverse(
        latents.to(model.device), labels, guidance_scale=guidance_scale if labels is not None else 1.0
    )
    if config.noise_std > 0:
        images = model.denoise(images, labels)  # the Tweedie step the pipeline applies by default
    model.train(was_training)
    images = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    c, s = config.num_channels, config.image_size
    grid = images.view(rows, per_class, c, s, s).permute(0, 3, 1, 4, 2).reshape(rows * s, per_class * s, c)
    array = grid.squeeze(-1).numpy() if c == 1 else grid.numpy()
    with atomic_file(path) as staging:
        Image.fromarray(array).save(staging, format="PNG")


def save_pipeline_folder(
    model: TarFlowModel, target: Path, args: argparse.Namespace, recipe: dict, summary: dict, command: str
) -> Path:
    """The final pipeline folder (replacing the one an earlier run of this output directory wrote), with a model card
    (tarflow_hf.hub) holding the recipe, the command and the last training metrics. The card names the Hub
    repository when the run pushes there, else the folder; fine-tuning names the base model."""
    from .hub import TrainingInfo, hub_id, model_card, save_pipeline
    from .pipeline_tarflow import TarFlowPipeline

    pipe = TarFlowPipeline(transformer=model)
    card = model_card(
        pipe,
        repo_id=args.push_to_hub or str(target),
        datasets=[args.dataset],
        base_model=hub_id(args.init_from),  # the Hub's base_model names repositories, not local folders
        training=TrainingInfo(recipe=recipe, command=command, metrics=summary),
    )
    with atomic_folder(target, overwrite=True) as staging:
        save_pipeline(pipe, staging, card=card, overwrite_model_card=True)
    return target


def push_to_hub(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload the pipeline folder as it is (tarflow_hf.hub's upload path); returns the commit URL."""
    from .hub import upload_folder

    info = upload_folder(folder, repo_id, private=private, commit_message="Upload TarFlow trained with tarflow-hf")
    return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------------------- train
def train(args: argparse.Namespace) -> TrainResult:
    """Run training as described by `args` (see `add_arguments`)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    _check_args(args)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    output_dir = Path(args.output_dir)
    trackers = None if args.report_to in (None, "none") else args.report_to
    accelerator = Accelerator(
        cpu=use_cpu(args.cpu),
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(output_dir),
    )
    world = accelerator.num_processes * args.gradient_accumulation_steps
    if args.batch_size % world:
        raise ValueError(
            f"--batch-size {args.batch_size} must be divisible by processes x accumulation steps = {world}"
        )
    micro_batch = args.batch_size // world
    set_seed(args.seed)  # same initial weights on every process

    dataset = load_image_dataset(
        args.dataset, args.split, args.image_size, data_dir=args.data_dir, image_column=args.image_column
    )
    image, _ = dataset[0]
    num_channels, image_size = image.shape[0], image.shape[-1]
    if image.shape[-1] != image.shape[-2]:
        raise ValueError(f"images must be square; got {tuple(image.shape[1:])}, pass --image-size")
    class_names = list(getattr(dataset, "class_names", []))
    model = build_model(args, class_names, num_channels, image_size)
    # The config records the noise the weights are trained for: denoising and the model card read it.
    model.config.noise_std = args.noise_std if args.noise_type == "gaussian" else 0.0
    if model.config.num_classes == 0 and args.drop_label:
        args.drop_label = 0.0  # nothing to drop for an unconditional model
    model.train()

    sampler = EpochShuffleSampler(len(dataset), seed=args.seed)
    loader = DataLoader(dataset, batch_size=micro_batch, sampler=sampler, drop_last=True, num_workers=args.num_workers)
    batches_per_epoch = len(loader) // accelerator.num_processes
    steps_per_epoch = batches_per_epoch // args.gradient_accumulation_steps
    if steps_per_epoch < 1:
        raise ValueError(f"{dataset_summary(dataset)} is less than one batch of {args.batch_size}")
    total_steps = args.max_steps or args.epochs * steps_per_epoch
    warmup = args.warmup_steps if args.warmup_steps is not None else min(steps_per_epoch, max(1, total_steps // 10))

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.min_lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.weight_decay,
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    raw_model: TarFlowModel = accelerator.unwrap_model(model)
    forward = torch.compile(model) if args.compile else model
    ema = EMA(raw_model, args.ema_decay) if args.ema_decay > 0 else None
    # Our own generator for noise and label dropout: its state is checkpointed, so resuming continues the
    # same random stream whatever the data loader or other code drew from the global generators.
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed * 1000 + accelerator.process_index)

    progress = Progress()
    if args.resume:
        checkpoint = resolve_resume(args.resume, output_dir)
        if checkpoint is not None:
            progress = load_checkpoint(accelerator, checkpoint, ema, generator)
            accelerator.print(f"resumed from {checkpoint} at step {progress.step}")
        elif accelerator.is_main_process:
            print(f"--resume latest: no checkpoint in {output_dir / 'checkpoints'}, starting fresh")

    recipe = {
        key: value
        for key, value in vars(args).items()
        if key not in ("run", "command", "push_to_hub", "no_progress", "resume", "torch_threads")
    }
    recipe.update(num_processes=accelerator.num_processes, total_steps=total_steps, warmup_steps=warmup)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "recipe.json", recipe, sort_keys=True)
    if trackers:
        accelerator.init_trackers("tarflow", config={k: v for k, v in recipe.items() if v is not None})

    sample_guidance = args.sample_guidance_scale or args.default_guidance_scale or 1.0
    metrics_file = output_dir / "metrics.jsonl"
    bar = None
    if accelerator.is_main_process and not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=progress.step, desc="train", dynamic_ncols=True)
    accelerator.print(
        f"{dataset_summary(dataset)}; {total_steps} steps of {args.batch_size} "
        f"({accelerator.num_processes} process(es) x {args.gradient_accumulation_steps} accumulation x {micro_batch})"
    )

    start = time.time() - progress.elapsed_seconds
    window_loss, window_bpd, window_count = 0.0, 0.0, 0
    last_metrics: dict = {}
    while progress.step < total_steps:
        loader.set_epoch(progress.epoch)
        epoch_loader = loader
        if progress.batches_in_epoch:
            epoch_loader = accelerator.skip_first_batches(loader, progress.batches_in_epoch)
        for images, labels in epoch_loader:
            progress.batches_in_epoch += 1
            lr = cosine_lr(progress.step, total_steps, warmup, args.lr, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            inputs = add_noise(images, args.noise_type, args.noise_std, generator)
            labels = drop_labels(labels, args.drop_label, generator) if raw_model.config.num_classes else None
            with accelerator.accumulate(model):
                output = forward(inputs, labels)
                if not torch.isfinite(output.loss):
                    raise FloatingPointError(
                        f"non-finite loss at step {progress.step}; lower --lr or --max-grad-norm, or resume from "
                        "the last checkpoint"
                    )
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss += output.loss.detach()
            window_bpd += output.bits_per_dim.detach().mean()
            window_count += 1
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            if ema is not None:
                ema.update(raw_model)
            if bar is not None:
                bar.update(1)
            if progress.step % args.log_every == 0 or progress.step == total_steps:
                stats = torch.stack([window_loss / window_count, window_bpd / window_count]).float()
                stats = accelerator.reduce(stats, reduction="mean")
                last_metrics = {
                    "step": progress.step,
                    "epoch": progress.epoch,
                    "lr": lr,
                    "loss": stats[0].item(),
                    "bits_per_dim": stats[1].item(),
                    "elapsed_s": round(time.time() - start, 1),
                }
                window_loss, window_bpd, window_count = 0.0, 0.0, 0
                if bar is not None:
                    bar.set_postfix(loss=f"{last_metrics['loss']:.4f}", bpd=f"{last_metrics['bits_per_dim']:.3f}")
                if accelerator.is_main_process:
                    with metrics_file.open("a") as handle:
                        handle.write(json.dumps(last_metrics) + "\n")
                if trackers:
                    accelerator.log({k: v for k, v in last_metrics.items() if k != "step"}, step=progress.step)
            if args.sample_every and progress.step % args.sample_every == 0 and accelerator.is_main_process:
                sample_model = _ema_model(raw_model, ema)
                save_sample_grid(
                    sample_model, output_dir / "samples" / f"step_{progress.step:07d}.png", sample_guidance, args.seed
                )
            if args.checkpoint_every and progress.step % args.checkpoint_every == 0:
                progress.elapsed_seconds = time.time() - start
                save_checkpoint(accelerator, output_dir, progress, ema, generator, args.keep_checkpoints)
            if progress.step >= total_steps or progress.step == args.stop_after_steps:
                break
        else:
            progress.epoch += 1
            progress.batches_in_epoch = 0
        if progress.step == args.stop_after_steps:
            break
    if bar is not None:
        bar.close()
    wall = time.time() - start
    accelerator.wait_for_everyone()
    if progress.step < total_steps:
        progress.elapsed_seconds = wall
        checkpoint = save_checkpoint(accelerator, output_dir, progress, ema, generator, args.keep_checkpoints)
        accelerator.print(f"stopped at step {progress.step} of {total_steps}; resume with --resume {checkpoint}")
        return TrainResult(raw_model, _ema_model(raw_model, ema), progress, None)

    final_dir = output_dir / "model"
    if accelerator.is_main_process:
        final_model = _ema_model(raw_model, ema)
        if args.default_guidance_scale is not None:
            final_model.config.default_guidance_scale = args.default_guidance_scale
        save_sample_grid(final_model, output_dir / "samples" / "final.png", sample_guidance, args.seed)
        summary = {**last_metrics, "train_wall_time_s": round(wall, 1), "ema": ema is not None}
        command = format_command(args)
        save_pipeline_folder(final_model, final_dir, args, recipe, summary, command)
        write_json_atomic(output_dir / "train_summary.json", summary)
        print(f"saved pipeline folder {final_dir} ({wall / 60:.1f} min)")
        if args.push_to_hub:
            url = push_to_hub(final_dir, args.push_to_hub, private=args.hub_private)
            print(f"pushed to {url}")
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(raw_model, _ema_model(raw_model, ema), progress, final_dir)


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


def _ema_model(model: TarFlowModel, ema: EMA | None) -> TarFlowModel:
    """A copy of `model` holding the EMA weights (or the model itself without EMA)."""
    if ema is None:
        return model
    copy = TarFlowModel(TarFlowConfig.from_dict(model.config.to_dict())).to(model.device)
    ema.copy_to(copy)
    copy.eval()
    return copy


def run(args: argparse.Namespace) -> int:
    train(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .cli import run_command

    return run_command("train", argv)


if __name__ == "__main__":
    sys.exit(main())
