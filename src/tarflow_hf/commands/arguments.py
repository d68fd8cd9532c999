"""The command line's arguments, one function per sub-command, apart from the code each drives: building the parser
(and so `tarflow-hf --help`, `tarflow-hf train --help`) imports neither torch nor diffusers; `tarflow_hf.commands`
imports a sub-command's module only to run it. Each flag is declared here, once.

Standard library, `tarflow_hf.labels`, `tarflow_hf.registry` and `tarflow_hf.training.defaults` only (a test checks
that torch stays unimported).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..labels import LABEL_CHOICES
from ..registry import APPLE_TARFLOW_CHANNELS, APPLE_TARFLOW_FILE_NAME, STARFLOW_TEXT_ENCODER, STARFLOW_VAE
from ..training.defaults import (
    FINE_TUNE_LR,
    LORA_TARGET_MODULES,
    NEW_MODEL_DEFAULTS,
    TRAIN_LR,
    TRAIN_NOISE_STD,
    WARMUP_PERCENT,
)

# `tarflow-hf sample --dtype`: names of torch dtypes (the sub-command maps them).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _option(group: argparse._ArgumentGroup, flag: str, kind: Any, default: Any, text: str = "", **kwargs: Any) -> None:
    """`group.add_argument(flag, type=kind, default=default, ...)` with the help `text` ending in "(default: ...)"."""
    group.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)".lstrip(), **kwargs)


def train(parser: argparse.ArgumentParser) -> None:
    """`tarflow-hf train`. Every option's help shows its default; numbers are checked as they are parsed."""
    for add_group in (_train_data, _train_model, _train_recipe, _train_lora, _train_output):
        add_group(parser)


def _train_data(parser: argparse.ArgumentParser) -> None:
    """What to train on."""
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="'mnist', 'fashion-mnist', an image folder, or a datasets name; for STARFlow an image folder with "
        "metadata.jsonl (file_name and caption columns, as datasets' imagefolder) or a datasets dataset with captions",
    )
    data.add_argument(
        "--data-dir",
        default=None,
        help="folder with the IDX files for mnist / fashion-mnist (default: the installed offline copy)",
    )
    _option(data, "--split", None, "train", "dataset split")
    data.add_argument("--image-column", default=None, help="image column of a `datasets` dataset (default: guessed)")
    data.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="square image size: resize and centre-crop (IDX: pad) every image (default: the data's own)",
    )
    data.add_argument("--unconditional", action="store_true", help="ignore the labels: train num_classes=0")
    _option(data, "--caption-column", None, "text", "STARFlow: the captions' column")


def _train_model(parser: argparse.ArgumentParser) -> None:
    """A new model's size, or the model to fine-tune."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--init-from",
        default=None,
        metavar="MODEL",
        help="fine-tune this pipeline folder, Hub repo id, or 'bundled' (the MNIST model shipped with the package); "
        "it brings its own architecture, noise level, default guidance and label names; a StarFlowPipeline is "
        "fine-tuned text-to-image in its VAE's latent space (only the transformer trains) (default: a new model)",
    )
    model.add_argument(
        "--replace-labels",
        action="store_true",
        help="fine-tuning: take the dataset's class names (the same names keep their ids); the table is printed",
    )
    model.add_argument(
        "--config", default=None, help="TarFlowConfig json for a new model, the flags below override (default: none)"
    )
    for name, default in NEW_MODEL_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        model.add_argument(flag, type=positive_int, default=None, help=f"new model (default: {default})")
    model.add_argument("--mlp-ratio", type=positive_int, default=None, help="new model (default: 4)")
    model.add_argument(
        "--no-nvp", action="store_true", help="new model: volume-preserving flow (shift only, learned prior variance)"
    )


def _train_recipe(parser: argparse.ArgumentParser) -> None:
    """The optimisation: Apple's recipe, with its defaults."""
    recipe = parser.add_argument_group("recipe")
    _option(recipe, "--batch-size", positive_int, 128, "global batch per optimizer step")
    _option(recipe, "--gradient-accumulation-steps", positive_int, 1)
    recipe.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"peak learning rate (default: {TRAIN_LR} for a new model, {FINE_TUNE_LR} with --init-from)",
    )
    recipe.add_argument(
        "--min-lr",
        type=non_negative_float,
        default=1e-6,
        help="start and end of the schedule (default: %(default)s, Apple's)",
    )
    recipe.add_argument(
        "--warmup-steps",
        type=non_negative_int,
        default=None,
        help=f"linear warm-up steps (default: a new model one epoch as Apple, at most {WARMUP_PERCENT}%% of the "
        f"steps; with --init-from {WARMUP_PERCENT}%% of the steps, at least 1)",
    )
    _option(recipe, "--weight-decay", non_negative_float, 1e-4)
    _option(recipe, "--adam-beta1", unit_interval_float, 0.9)
    _option(recipe, "--adam-beta2", unit_interval_float, 0.95)
    _option(recipe, "--max-grad-norm", non_negative_float, 1.0, "0 disables clipping")
    recipe.add_argument(
        "--epochs", type=positive_int, default=1, help="training length, unless --max-steps is given (default: 1)"
    )
    recipe.add_argument(
        "--max-steps", type=positive_int, default=None, help="optimizer steps (default: --epochs worth of steps)"
    )
    recipe.add_argument(
        "--stop-after-steps",
        type=positive_int,
        default=None,
        help="checkpoint and stop at this step, keeping the schedule of the full run (time-sliced jobs; "
        "default: run to the end)",
    )
    _option(recipe, "--noise-type", None, "gaussian", "", choices=("gaussian", "uniform"))
    recipe.add_argument(
        "--noise-std",
        type=non_negative_float,
        default=None,
        help=f"Gaussian noise std, Apple's noise_std (default: {TRAIN_NOISE_STD} for a new model; "
        "with --init-from the model's own)",
    )
    _option(
        recipe,
        "--drop-label",
        unit_interval_float,
        0.1,
        'probability of replacing a label by -1 (STARFlow: a caption by "")',
    )
    _option(recipe, "--ema-decay", unit_interval_float, 0.999, "0 disables EMA")
    _option(recipe, "--mixed-precision", None, "no", "", choices=("no", "bf16", "fp16"))
    recipe.add_argument("--compile", action="store_true", help="torch.compile the model")
    recipe.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)"
    )
    _option(recipe, "--seed", non_negative_int, 0)
    recipe.add_argument(
        "--num-workers", type=non_negative_int, default=0, help="data loader workers per process (default: 0)"
    )
    recipe.add_argument(
        "--default-guidance-scale",
        type=finite_float,
        default=None,
        help="guidance a pipeline uses when none is given, stored in the config (default: 1.0 for a new model; "
        "with --init-from the model's own)",
    )


def _train_lora(parser: argparse.ArgumentParser) -> None:
    """LoRA fine-tuning: an adapter trains, the pretrained weights stay as they are."""
    lora = parser.add_argument_group("LoRA (with --init-from)")
    lora.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        metavar="R",
        help="train a LoRA adapter of rank R instead of all the weights; only the adapter is written "
        "(model/pytorch_lora_weights.safetensors, as diffusers names it) and uploaded (default: no LoRA)",
    )
    lora.add_argument(
        "--lora-alpha",
        type=positive_float,
        default=None,
        metavar="A",
        help="LoRA scale numerator: the update is A / R * B @ A_lora (default: R, a scale of 1)",
    )
    lora.add_argument(
        "--lora-target-modules",
        default=None,
        metavar="NAMES",
        help="comma list of the linear layers to adapt, by name (default: "
        f"{','.join(LORA_TARGET_MODULES)}: attention projections and MLP layers of every flow block)",
    )


def _train_output(parser: argparse.ArgumentParser) -> None:
    """Where results go: checkpoints, samples, the pipeline folder, the Hub."""
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="run folder: checkpoints/, samples/, metrics.jsonl, model/")
    out.add_argument(
        "--resume",
        default=None,
        help="'latest' (the newest intact checkpoint) or a checkpoint folder; resuming from an earlier checkpoint "
        "moves the later ones aside (renamed, not deleted) (default: start afresh)",
    )
    _option(out, "--checkpoint-every", non_negative_int, 500, "steps between checkpoints, 0 for none")
    _option(out, "--keep-checkpoints", positive_int, 2, "how many checkpoints to keep")
    _option(out, "--log-every", positive_int, 20, "steps between metric lines")
    _option(out, "--sample-every", non_negative_int, 0, "steps between sample grids, 0 for the final grid only")
    out.add_argument(
        "--sample-guidance-scale",
        type=finite_float,
        default=None,
        help="guidance of the sample grids (default: the model's default guidance scale)",
    )
    out.add_argument(
        "--report-to",
        default=None,
        metavar="TRACKERS",
        help="comma list of accelerate trackers (tensorboard, wandb, ...) or 'all': metrics and sample grids; the "
        "tracker's package must be installed (default: none)",
    )
    out.add_argument(
        "--license",
        default=None,
        help="Hub license id for the model card (default: the fine-tuned model's, else 'other')",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    out.add_argument(
        "--push-to-hub", default=None, metavar="REPO", help="upload the final pipeline folder (default: no upload)"
    )
    out.add_argument("--hub-private", action="store_true", help="make a new Hub repository private")
    out.add_argument(
        "--torch-threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    out.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")


def _number(text: str, kind: type = float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
        ) from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    return _number(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def unit_interval_float(text: str) -> float:
    """argparse type: a number in [0, 1) (probabilities, decays, Adam's betas)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value}")
    return value


def evaluate(parser: argparse.ArgumentParser) -> None:
    """`tarflow-hf evaluate`."""
    parser.add_argument("model", help="pipeline folder, Hub repo id, or 'bundled' (the MNIST model of the package)")
    parser.add_argument("--dataset", default=None, help="'mnist', 'fashion-mnist', an image folder, ... (bpd/FID)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--metrics", default=None, help="comma list of bpd,fid,accuracy (default: all the inputs allow)"
    )
    parser.add_argument("--bpd-noise", default="uniform", help="uniform, gaussian or uniform,gaussian")
    parser.add_argument(
        "--bpd-max-images", type=int, default=None, metavar="N", help="bits/dim on the first N images (default: all)"
    )
    parser.add_argument("--bpd-unconditional", action="store_true", help="evaluate p(x) with the mean class")
    parser.add_argument("--num-samples", type=int, default=1000, help="generated samples for FID")
    parser.add_argument("--fid-reference-images", type=int, default=None, help="default: the whole split")
    parser.add_argument("--fid-stats-cache", default=None, help=".npz cache of the reference statistics")
    parser.add_argument(
        "--fid-real-split",
        default=None,
        help="score real images of this split instead of samples: the FID floor at this sample count",
    )
    parser.add_argument("--classifier", default=None, help="classifier folder (tarflow_hf.classifier)")
    parser.add_argument("--samples-per-class", type=int, default=100, help="class-consistency samples per class")
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the config's")
    parser.add_argument("--guidance-rule", metavar="RULE", default=None, help=GUIDANCE_RULE_HELP)
    parser.add_argument("--no-denoise", action="store_true", help="skip the Tweedie denoising step")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-samples", default=None, help="write a PNG grid of the accuracy samples")
    parser.add_argument("--output", default=None, help="JSON file for the metrics (also printed)")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _flags(actions: list[argparse.Action]) -> tuple[tuple[str, str], ...]:
    """(flag, argument name) of each option."""
    return tuple((action.option_strings[0], action.dest) for action in actions)


def convert(parser: argparse.ArgumentParser) -> None:
    """`tarflow-hf convert`. Each family's options are grouped, and the groups' flags go into the namespace
    (`family_flags`: family name -> (flag, argument name)), so the command refuses the other family's by them."""
    parser.add_argument(
        "source",
        metavar="CHECKPOINT",
        help="apple/ml-tarflow or apple/ml-starflow .pth state dict (with --reverse: a converted pipeline or model "
        "folder)",
    )
    parser.add_argument(
        "destination", metavar="OUTPUT", help="pipeline folder to create (with --reverse: the .pth file to write)"
    )
    parser.add_argument(
        "--reverse", action="store_true", help="convert a pipeline or model folder back to an Apple .pth"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier conversion's output folder (refused when it holds anything a conversion does not "
        "write, or the input) or .pth file",
    )
    tarflow = parser.add_argument_group("apple/ml-tarflow checkpoints")
    tarflow_flags = [
        tarflow.add_argument(
            "--noise-std",
            type=non_negative_float,
            default=None,
            metavar="S",
            help="std of the Gaussian noise the model was trained with (default: from Apple's file name, "
            f"{APPLE_TARFLOW_FILE_NAME})",
        ),
        tarflow.add_argument(
            "--in-channels",
            type=positive_int,
            default=None,
            metavar="C",
            help=f"image channels: the patch dimension is channels x patch**2 (default {APPLE_TARFLOW_CHANNELS})",
        ),
        tarflow.add_argument(
            "--labels",
            default=None,
            metavar="|".join((*LABEL_CHOICES, "FILE.json")),
            help="class names: a shipped table, none (generic names), or a JSON list / {'0': name} file "
            "(default: from the file name's dataset: afhq, imagenet; imagenet64 is unconditional)",
        ),
    ]
    starflow = parser.add_argument_group("apple/ml-starflow checkpoints (recognised by their weights)")
    starflow_flags = [
        starflow.add_argument(
            "--config",
            default=None,
            metavar="FILE.yaml",
            help="Apple's training config (default: the released configs/starflow_3B_t2i_256x256.yaml values)",
        ),
        starflow.add_argument(
            "--license-file",
            default=None,
            metavar="FILE",
            help="copy this license text (Apple's LICENSE_MODEL) into the output as LICENSE",
        ),
        starflow.add_argument(
            "--transformer-only",
            action="store_true",
            help="write the converted model alone (OUTPUT/transformer/), without text encoder, tokenizer and VAE",
        ),
        starflow.add_argument(
            "--text-encoder",
            default=None,
            metavar="ID_OR_PATH",
            help="T5 model whose encoder and tokenizer the pipeline uses (default: the one --config names, else "
            f"{STARFLOW_TEXT_ENCODER})",
        ),
        starflow.add_argument(
            "--vae",
            default=None,
            metavar="ID_OR_PATH",
            help=f"diffusers AutoencoderKL (default: the one --config names, else {STARFLOW_VAE})",
        ),
    ]
    parser.set_defaults(family_flags={"tarflow": _flags(tarflow_flags), "starflow": _flags(starflow_flags)})


# The samplers and guidance rules, as `--sampler` and `--guidance-rule` take them (`tarflow_hf.samplers`,
# `tarflow_hf.guidance`: written out here so that `--help` imports no torch).
SAMPLER_HELP = (
    "how each flow block is inverted, NAME[:key=value,...]: sequential (exact, the default), "
    "jacobi[:tolerance=1e-4,window=N,max_iterations=N,sequential_blocks=N] (parallel; about 1e-2 in bf16), "
    "newton[:tolerance=1e-4,sequential_blocks=N] (fewer passes, far more compute), "
    "block_jacobi[:block_size=16,threshold=1e-3,max_iterations=32,sequential_blocks=0] (Apple's, approximate)"
)
GUIDANCE_RULE_HELP = (
    "how guidance combines the branches, NAME[:key=value,...]: extrapolate (TarFlow's) or gaussian_product "
    "(STARFlow's), with target=both|scale|shift, schedule=constant|linear (annealed), unconditional_temperature=T "
    "(default: the model's own rule)"
)


def sample(parser: argparse.ArgumentParser) -> None:
    """`tarflow-hf sample`."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default="bundled",
        help="a pipeline folder (save_pretrained / convert), a Hub repo id, or 'bundled' (default): the MNIST model "
        "shipped with the package",
    )
    parser.add_argument(
        "--class-label",
        action="append",
        dest="class_labels",
        metavar="LABEL",
        help="class id or name (repeat for several classes); -1 or none at all samples the unconditional branch",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        dest="prompts",
        metavar="TEXT",
        help="text-to-image (STARFlow) models: the prompt (repeat for several); the grid's captions",
    )
    parser.add_argument(
        "--negative-prompt",
        action="append",
        dest="negative_prompts",
        metavar="TEXT",
        help="STARFlow: guidance's unconditional text (one for all prompts, or one per prompt; default empty)",
    )
    parser.add_argument("--height", type=int, default=None, help="STARFlow: image height (default: the model's)")
    parser.add_argument("--width", type=int, default=None, help="STARFlow: image width (default: the model's)")
    parser.add_argument(
        "--num-images", metavar="N", type=int, default=4, help="images per class label or prompt (default: 4)"
    )
    parser.add_argument(
        "--batch-size",
        metavar="B",
        type=int,
        default=16,
        help="images sampled at once (default: 16); bounds memory, the images do not depend on it",
    )
    _sample_settings(parser)


def _sample_settings(parser: argparse.ArgumentParser) -> None:
    """How to sample (guidance, sampler, denoising, seed) and where the images go."""
    parser.add_argument(
        "--guidance-scale",
        metavar="W",
        type=float,
        default=None,
        help="classifier-free guidance, 1 = none (Apple's --cfg g is 1 + g); default: the model's own",
    )
    parser.add_argument("--guidance-rule", metavar="RULE", default=None, help=GUIDANCE_RULE_HELP)
    parser.add_argument(
        "--attention-temperature",
        metavar="T",
        type=float,
        default=1.0,
        help="divides every attention logit, in every branch (default: 1)",
    )
    parser.add_argument("--sampler", metavar="SAMPLER", default=None, help=SAMPLER_HELP)
    parser.add_argument("--no-denoise", dest="denoise", action="store_false", help="skip the final denoising step")
    parser.add_argument(
        "--denoise-strength",
        metavar="S",
        type=float,
        default=None,
        help="scale of the final score-denoising step (default: 1, the model's training noise)",
    )
    parser.add_argument(
        "--seed", type=int, default=None, help="image i uses seed + i (default: a random seed, printed)"
    )
    parser.add_argument(
        "--output",
        metavar="PATH",
        default="samples.png",
        help="a grid image to write (default: samples.png), or a folder (ending in /) for one file per image, "
        "written batch by batch",
    )
    parser.add_argument(
        "--columns",
        metavar="N",
        type=int,
        default=None,
        help="grid columns (default: a row per label, or a square grid for one label)",
    )
    parser.add_argument("--no-captions", dest="captions", action="store_false", help="do not write labels under images")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--revision", metavar="REV", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


# Sub-command name -> the function adding its arguments.
ARGUMENTS = {"train": train, "evaluate": evaluate, "convert": convert, "sample": sample}

__all__ = [
    "ARGUMENTS",
    "DTYPE_NAMES",
    "non_negative_float",
    "positive_int",
]
