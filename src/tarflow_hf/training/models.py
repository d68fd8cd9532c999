"""The model to train: a new TarFlow from the flags (and `--config`), or the model `--init-from` names, checked
against the data; its labels aligned with the dataset's classes; the defaults it decides (noise, guidance)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..configuration_tarflow import TarFlowConfig
from ..data import RelabeledDataset, check_dataset, load_image_dataset
from ..modeling_tarflow import TarFlowModel
from ..registry import resolve_model_name
from .defaults import MODEL_SIZE_FLAGS, NEW_MODEL_DEFAULTS, TRAIN_NOISE_STD

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from ..pipeline_tarflow import TarFlowPipeline
    from .state import FlowModel

# Keys of a `--config` file that describe a saved model rather than the architecture.
SAVED_CONFIG_KEYS = ("architectures", "auto_map", "transformers_version", "model_type", "id2label", "label2id")


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


def new_model(args: argparse.Namespace, class_names: list[str], num_channels: int, image_size: int) -> TarFlowModel:
    """A new model from `--config` and the size flags (which override it), sized to the data."""
    num_classes = 0 if args.unconditional else len(class_names)
    settings = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read --config {args.config}: {error}") from error
        for key in SAVED_CONFIG_KEYS:
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


def load_base_pipeline(source: str, num_classes: int, num_channels: int, image_size: int) -> TarFlowPipeline:
    """The TarFlow pipeline `--init-from` names, its transformer in float32 and fitting the data."""
    from ..pipeline_tarflow import TarFlowPipeline

    pipe = TarFlowPipeline.from_pretrained(resolve_model_name(source))
    config = pipe.transformer.float().config
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
    return pipe


def base_model_license(source: str | None) -> str | None:
    """The license in the card of the model `--init-from` names (a local folder, or a Hub download already in
    the cache), so that fine-tuning keeps it; None when there is none to read."""
    if not source:
        return None
    from huggingface_hub import ModelCard, try_to_load_from_cache

    path = resolve_model_name(source)
    readme = Path(path, "README.md") if Path(path).is_dir() else try_to_load_from_cache(path, "README.md")
    if not isinstance(readme, (str, Path)) or not Path(readme).is_file():
        return None
    try:
        return ModelCard.load(readme).data.license
    except Exception:  # an unreadable card keeps the default license
        return None


def align_labels(
    model: TarFlowModel, dataset: Dataset, replace: bool, say: Callable[[str], None] = print
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


def resolve_model_defaults(args: argparse.Namespace, model: FlowModel) -> None:
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


__all__ = [
    "align_labels",
    "base_model_license",
    "label_table",
    "load_base_pipeline",
    "load_training_data",
    "new_model",
    "resolve_model_defaults",
]
