"""LoRA fine-tuning (`--lora-rank`): a LoRA adapter (PEFT's, through `tarflow_hf.lora`) in the attention and MLP
layers of the pretrained flow, the only thing that trains; the frozen weights are kept in the mixed-precision dtype
(as diffusers' LoRA scripts keep them), the adapter in float32. What the run writes is the adapter alone, as diffusers
names it (`model/pytorch_lora_weights.safetensors`, the adapter's `LoraConfig` in its metadata) with a LoRA model card;
`--push-to-hub` uploads that folder.

An adapter carries weights only, so a LoRA run refuses the flags that would change the base model's configuration
(label names, noise level, default guidance) and volume-preserving models, whose prior variance trains outside the
adapter.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..fileio import atomic_folder
from ..lora import PEFT_MISSING, LoraMixin, add_lora_adapter, is_lora_folder, loaded_adapters
from ..registry import is_flow_folder
from .defaults import LORA_TARGET_MODULES
from .layout import MODEL_DIR

if TYPE_CHECKING:
    from .state import FlowModel, Run

# The adapter's name while training (PEFT's default); the file does not keep it.
ADAPTER_NAME = "default"
# Flags that change the base model's configuration, which an adapter cannot carry.
CONFIG_FLAGS = (
    ("--replace-labels", "replace_labels"),
    ("--noise-std", "noise_std"),
    ("--default-guidance-scale", "default_guidance_scale"),
)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def lora_requested(args: argparse.Namespace) -> bool:
    return getattr(args, "lora_rank", None) is not None


def check_lora_args(args: argparse.Namespace) -> None:
    """The LoRA flags together, before anything loads: one ValueError line for what cannot work."""
    if not lora_requested(args):
        for flag, name in (("--lora-alpha", "lora_alpha"), ("--lora-target-modules", "lora_target_modules")):
            if getattr(args, name, None) is not None:
                raise ValueError(f"{flag} needs --lora-rank")
        return
    if not args.init_from:
        raise ValueError("--lora-rank fine-tunes a pretrained model: give it with --init-from")
    given = [flag for flag, name in CONFIG_FLAGS if getattr(args, name, None) not in (None, False)]
    if args.noise_type != "gaussian":
        given.append(f"--noise-type {args.noise_type}")
    if given:
        raise ValueError(
            f"{given[0]} changes the base model's configuration, which a LoRA adapter does not carry (it keeps the "
            "base's label names, noise level and default guidance); drop it, or fine-tune without --lora-rank"
        )
    if importlib.util.find_spec("peft") is None:
        raise ValueError(f"--lora-rank: {PEFT_MISSING}")


def target_modules(args: argparse.Namespace) -> list[str]:
    text = args.lora_target_modules or ",".join(LORA_TARGET_MODULES)
    return [name.strip() for name in text.split(",") if name.strip()]


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Each target names linear layers of the model (by its last name part, as PEFT matches), else one line listing
    the names the model's linear layers have."""
    linear = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            names = sorted({name.rpartition(".")[2] for name in linear})
            raise ValueError(
                f"--lora-target-modules {target}: no linear layer of {type(model).__name__} is named so; its linear "
                f"layers are named {', '.join(names)}"
            )


def add_training_adapter(run: Run) -> None:
    """The adapter in `run.raw_model`: the base frozen (in the mixed-precision dtype), the adapter in float32."""
    from peft import LoraConfig

    args, model = run.args, run.raw_model
    if not getattr(model.config, "nvp", True):
        raise ValueError(
            "--lora-rank: this model is volume-preserving (nvp=False) and learns its prior variance, which a LoRA "
            "adapter does not carry; fine-tune it without --lora-rank"
        )
    targets = target_modules(args)
    check_targets(model, targets)
    if args.mixed_precision in DTYPES:
        model.to(DTYPES[args.mixed_precision])
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else args.lora_rank,
        init_lora_weights="gaussian",  # B = 0: training starts from the base model exactly
        target_modules=targets,
    )
    add_lora_adapter(model, config, ADAPTER_NAME)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    run.accelerator.print(
        f"LoRA rank {config.r}, alpha {config.lora_alpha:g} on {', '.join(targets)}: {trained:,} trained parameters "
        f"of {total:,} ({100 * trained / total:.2f}%)"
    )


def adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights in PEFT's format (keys without the adapter's name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)


def is_model_folder(folder: Path) -> bool:
    """A run's `model/` folder as this program writes it: a pipeline folder, or a LoRA run's adapter folder (what a
    later run of the output directory may replace)."""
    return is_lora_folder(folder) or is_flow_folder(folder)


def save_adapter_folder(
    run: Run, model: FlowModel, summary: dict[str, Any], base_model: str | None, dataset: str
) -> Path:
    """`model/`: the adapter as diffusers writes it (`pytorch_lora_weights.safetensors`, `LoraConfig` metadata) and its
    model card (`base_model`: how the card names the pipeline adapted; `dataset`: the data's name), replacing what an
    earlier run of this output directory wrote there."""
    from ..hub import TrainingInfo, lora_card

    args = run.args
    target = run.output_dir / MODEL_DIR
    (name,) = loaded_adapters(model)
    card = lora_card(
        model,
        base_model=base_model,
        repo_id=args.push_to_hub or str(target),
        license=getattr(args, "license", None) or run.base_license,
        datasets=[dataset],
        training=TrainingInfo(recipe=run.recipe, command=run.command, metrics=summary),
    )
    with atomic_folder(target, overwrite=True, may_replace=is_model_folder) as staging:
        LoraMixin.save_lora_weights(
            staging,
            transformer_lora_layers=adapter_weights(model),
            transformer_lora_adapter_metadata=model.peft_config[name],
        )
        card.save(staging / "README.md")
    return target


__all__ = [
    "ADAPTER_NAME",
    "adapter_weights",
    "add_training_adapter",
    "check_lora_args",
    "check_targets",
    "is_model_folder",
    "lora_requested",
    "save_adapter_folder",
    "target_modules",
]
