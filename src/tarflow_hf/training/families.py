"""The model families as training sees them: a small adapter each (`TarFlowFamily`, `StarFlowFamily`: load the model
and its data, turn a batch into the model's inputs, draw a sample grid, build the pipeline saved around the trained
model); everything else (schedule, EMA, accumulation, clipping, checkpoints, resume, grids, card) is shared.

TarFlow trains class-conditional (or unconditional) images in pixel space, a dropped label being -1. STARFlow
trains captioned images in its VAE's latent space as Apple's `train.py` does:
`z = vae.encode(img).latent_dist.sample() * scaling_factor + noise_std * N(0, 1)`, captions through the pipeline's
`encode_prompt` (T5 frozen), a dropped caption being `""`; only the transformer trains.
"""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from ..data import check_dataset, load_captioned_dataset
from ..registry import STARFLOW, family_of, resolve_model_name
from ..samplers import SequentialSampler
from .models import (
    align_labels,
    base_model_license,
    label_table,
    load_base_pipeline,
    load_training_data,
    new_model,
    resolve_model_defaults,
)
from .recipe import add_noise, drop_captions, drop_labels

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from PIL.Image import Image

    from ..data import CaptionedImageFolder, HFCaptionedDataset
    from ..modeling_starflow import StarFlowModel
    from ..modeling_tarflow import TarFlowModel
    from ..pipeline_starflow import StarFlowPipeline
    from ..pipeline_tarflow import TarFlowPipeline
    from ..samplers import FlowSampler
    from .state import Batch, Family, Run

# TarFlow sample grids: images per class row, rows at most (one per class), rows of an unconditional model.
SAMPLES_PER_CLASS = 8
SAMPLE_CLASS_ROWS = 10
SAMPLE_UNCONDITIONAL_ROWS = 4
# Sample grids are drawn exactly (whatever sampler the pipeline keeps), so that they compare across steps and runs.
GRID_SAMPLER = SequentialSampler()
# STARFlow sample grids: prompts taken from the dataset, images per prompt, caption width in characters.
SAMPLE_PROMPTS = 4
SAMPLE_IMAGES_PER_PROMPT = 2
SAMPLE_CAPTION_CHARS = 40


def family_for(init_from: str | None) -> Family:
    """The adapter of the family `--init-from` names (`tarflow_hf.registry.family_of`); a new model is a TarFlow."""
    if init_from and family_of(init_from) is STARFLOW:
        return StarFlowFamily()
    return TarFlowFamily()


@contextlib.contextmanager
def sampling(model: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode while sampling, the previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class TarFlowFamily:
    """TarFlow: class-conditional (or unconditional) images in pixel space; labels dropped to -1."""

    title = "TarFlow"

    def __init__(self) -> None:
        self.sampler: FlowSampler | None = None  # the sampler of the pipeline fine-tuned from, which the output keeps

    def check_args(self, args: argparse.Namespace) -> None:
        pass

    def load(self, run: Run) -> None:
        """The model to train (new, or `--init-from`'s with its labels aligned) and the defaults it decides."""
        args = run.args
        dataset, num_channels, image_size = load_training_data(args)
        class_names = list(getattr(dataset, "class_names", []))
        if not args.init_from:
            model = new_model(args, class_names, num_channels, image_size)
        else:
            num_classes = 0 if args.unconditional else len(class_names)
            base = load_base_pipeline(args.init_from, num_classes, num_channels, image_size)
            model, self.sampler = base.transformer, base.sampler
            dataset, table = align_labels(model, dataset, args.replace_labels, say=run.accelerator.print)
            if table is not None:
                run.accelerator.print(label_table(table))
            run.base_license = base_model_license(args.init_from)
        resolve_model_defaults(args, model)
        run.dataset, run.raw_model = dataset, model

    def encode_batch(self, run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(noisy images, labels with dropout, or None for an unconditional model)."""
        images, labels = batch
        args = run.args
        inputs = add_noise(images, args.noise_type, args.noise_std, run.generator)
        labels = drop_labels(labels, args.drop_label, run.generator) if run.raw_model.config.num_classes else None
        return inputs, labels

    def sample_grid(self, run: Run, model: TarFlowModel) -> Image:
        """One row per class (at most SAMPLE_CLASS_ROWS, the class name under the row's first image), or
        SAMPLE_UNCONDITIONAL_ROWS rows for an unconditional model; fixed latents, so grids compare across steps."""
        from ..grids import make_grid

        config, per = model.config, SAMPLES_PER_CLASS
        rows = min(config.num_classes, SAMPLE_CLASS_ROWS) if config.num_classes else SAMPLE_UNCONDITIONAL_ROWS
        generator = torch.Generator().manual_seed(run.args.seed)
        latents = torch.randn(rows * per, config.num_patches, config.patch_dim, generator=generator)
        labels = torch.arange(rows).repeat_interleave(per) if config.num_classes else None
        guidance = run.sample_guidance if labels is not None else 1.0
        pipe = self.build_pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        with sampling(model):
            tiles = pipe(class_labels=labels, latents=latents, guidance_scale=guidance, sampler=GRID_SAMPLER).images
        captions = None
        if labels is not None:
            captions = [str(config.id2label.get(i // per, "")) if i % per == 0 else "" for i in range(len(tiles))]
        return make_grid(tiles, per, captions)

    def build_pipeline(self, model: TarFlowModel) -> TarFlowPipeline:
        from ..pipeline_tarflow import TarFlowPipeline

        return TarFlowPipeline(transformer=model, sampler=self.sampler)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apple's training latents: `vae.encode(img).latent_dist.sample() * scaling_factor` (less the VAE's
    `shift_factor`, if it has one), float32; `images` in [-1, 1]."""
    pixels = images.to(device=vae.device, dtype=vae.dtype)
    z = vae.encode(pixels).latent_dist.sample(generator)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((z - shift) * vae.config.scaling_factor).float()


def pick_prompts(dataset: CaptionedImageFolder | HFCaptionedDataset, count: int = SAMPLE_PROMPTS) -> list[str]:
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


class StarFlowFamily:
    """STARFlow: captioned images, trained in the VAE's latent space with the frozen T5's embeddings; only the
    transformer trains, the pipeline's other components are kept (and saved) as loaded."""

    title = "STARFlow"

    def __init__(self) -> None:
        self.pipe: StarFlowPipeline | None = None  # the loaded pipeline: frozen text encoder, tokenizer, VAE
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
        from ..pipeline_starflow import StarFlowPipeline

        args, device = run.args, run.accelerator.device
        # The data first (a mistake there is found before a large model loads), then sized to the model.
        dataset = load_captioned_dataset(args.dataset, args.split, None, args.image_column, args.caption_column)
        pipe = StarFlowPipeline.from_pretrained(resolve_model_name(args.init_from))
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

    def encode_batch(self, run: Run, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy latents, text embeddings): captions dropped to "" with `--drop-label`, encoded by the pipeline's
        `encode_prompt`; latents sampled from the VAE posterior plus `noise_std` Gaussian noise (Apple's train.py)."""
        images, captions = batch
        args, device = run.args, run.accelerator.device
        captions = drop_captions(list(captions), args.drop_label, run.generator)
        embeds, _ = self.pipe.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
        latents = encode_latents(self.pipe.vae, images, run.generator)
        return add_noise(latents, "gaussian", args.noise_std, run.generator), embeds

    def sample_grid(self, run: Run, model: StarFlowModel) -> Image:
        """One row per prompt (SAMPLE_IMAGES_PER_PROMPT images, one seed each), the prompt under its first image."""
        from ..grids import make_grid

        pipe = self.build_pipeline(model)
        per = SAMPLE_IMAGES_PER_PROMPT
        generators = [torch.Generator().manual_seed(run.args.seed + i) for i in range(len(self.prompts) * per)]
        with sampling(model):
            images = pipe(
                self.prompts,
                num_images_per_prompt=per,
                guidance_scale=run.sample_guidance,
                sampler=GRID_SAMPLER,
                generator=generators,
            ).images
        captions = [textwrap.shorten(p, SAMPLE_CAPTION_CHARS) for p in self.prompts]
        return make_grid(images, per, [captions[i // per] if i % per == 0 else "" for i in range(len(images))])

    def build_pipeline(self, model: StarFlowModel) -> StarFlowPipeline:
        from ..pipeline_starflow import StarFlowPipeline

        base = self.pipe
        pipe = StarFlowPipeline(
            transformer=model,
            text_encoder=base.text_encoder,
            tokenizer=base.tokenizer,
            vae=base.vae,
            sampler=base.sampler,  # the folder keeps the base's sampler (model_index.json)
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


__all__ = [
    "StarFlowFamily",
    "TarFlowFamily",
    "drop_captions",
    "encode_latents",
    "family_for",
    "pick_prompts",
]
