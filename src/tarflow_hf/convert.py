"""Port apple/ml-tarflow checkpoints to TarFlowModel / TarFlowPipeline folders and back.

Command line (also `python conversion/convert_ml_tarflow.py ...`):

    tarflow-hf convert afhq_model_8_768_8_8_0.07.pth tarflow-afhq-256
    tarflow-hf convert my_run.pth out --noise-std 0.05 --in-channels 1 --labels classes.json
    tarflow-hf convert --reverse tarflow-afhq-256 afhq_model_8_768_8_8_0.07.pth

The configuration is read off the weights (see `infer_config`); Apple's checkpoint file name,
`{dataset}_model_{patch}_{width}_{blocks}_{layers}_{noise_std|uniform}.pth`, supplies what the weights cannot:
the training noise and the class names. Checkpoints are loaded with `torch.load(weights_only=True, mmap=True)`,
the model is built on the meta device and takes the memory-mapped tensors as they are, so a conversion holds a
single copy of the weights. Outputs are written to a temporary path next to the destination and renamed into
place, so a failed conversion leaves nothing behind.

Key layout of Apple's `transformer_flow.Model` state dict and ours:

    var                                         -> prior_variance
    blocks.{i}.pos_embed                        -> blocks.{i}.position_embedding
    blocks.{i}.class_embed (C, 1, W)            -> blocks.{i}.class_embedding (C, W)
    blocks.{i}.attn_mask                        -> (dropped: always the causal mask)
    blocks.{i}.attn_blocks.{j}.attention.*      -> blocks.{i}.layers.{j}.attention.*
    blocks.{i}.attn_blocks.{j}.mlp.norm         -> blocks.{i}.layers.{j}.mlp.norm
    blocks.{i}.attn_blocks.{j}.mlp.main.0 / .2  -> blocks.{i}.layers.{j}.mlp.fc1 / fc2
    blocks.{i}.proj_in, blocks.{i}.proj_out     -> unchanged
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .apple_checkpoints import (
    check_output_file,
    check_output_folder,
    check_state_dict,
    check_weight_values,
    key_indices,
    list_keys,
    load_apple_state_dict,
    meta_model,
    non_finite_weights,
    read_converted_folder,
    replaceable_output,
    save_apple_state_dict,
    shape_of,
    state_shapes,
)
from .configuration_tarflow import TarFlowConfig
from .fileio import atomic_folder
from .labels import resolve_labels
from .modeling_tarflow import TarFlowModel
from .registry import APPLE_TARFLOW_CHANNELS, APPLE_TARFLOW_FILE_NAME, TARFLOW

# Apple's `transformer_flow.Model` takes no head size: every released model uses MetaBlock's default of 64.
APPLE_HEAD_DIM = 64
# Dataset names in Apple's checkpoint file names -> their label table ("none": an unconditional model).
APPLE_DATASET_LABELS = {"afhq": "afhq", "imagenet": "imagenet", "imagenet64": "none"}
_APPLE_FILE_NAME = re.compile(
    r"^(?P<dataset>.+?)_model_(?P<patch_size>\d+)_(?P<hidden_size>\d+)_(?P<num_blocks>\d+)_"
    r"(?P<layers_per_block>\d+)_(?P<noise>uniform|\d+(?:\.\d+)?)\.pth$"
)

_RENAMES = [
    (r"^var$", "prior_variance"),
    (r"\.pos_embed$", ".position_embedding"),
    (r"\.class_embed$", ".class_embedding"),
    (r"\.attn_blocks\.", ".layers."),
    (r"\.mlp\.main\.0\.", ".mlp.fc1."),
    (r"\.mlp\.main\.2\.", ".mlp.fc2."),
]
_REVERSE_RENAMES = [
    (r"^prior_variance$", "var"),
    (r"\.position_embedding$", ".pos_embed"),
    (r"\.class_embedding$", ".class_embed"),
    (r"\.layers\.", ".attn_blocks."),
    (r"\.mlp\.fc1\.", ".mlp.main.0."),
    (r"\.mlp\.fc2\.", ".mlp.main.2."),
]


# ------------------------------------------------------------------------------------------------- key maps
def apple_key_to_hf(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def hf_key_to_apple(key: str) -> str:
    for pattern, replacement in _REVERSE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def apple_to_hf_state_dict(apple: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Apple's keys to ours; drop the causal masks; squeeze the class embeddings' middle axis."""
    converted = {}
    for key, tensor in apple.items():
        if key.endswith(".attn_mask"):
            continue
        new_key = apple_key_to_hf(key)
        converted[new_key] = tensor.squeeze(1) if new_key.endswith(".class_embedding") else tensor
    return converted


def hf_to_apple_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `apple_to_hf_state_dict`, including the causal masks Apple stores (placed where Apple's
    `state_dict()` has them, just before each block's `proj_in`, with the dtype and device of the block's
    position embedding, so meta tensors give meta masks)."""
    apple = {}
    for key, tensor in state.items():
        if key.endswith(".proj_in.weight"):
            positions = state[key.replace(".proj_in.weight", ".position_embedding")]
            num_patches = positions.shape[0]
            ones = torch.ones(num_patches, num_patches, dtype=positions.dtype, device=positions.device)
            apple[hf_key_to_apple(key).replace(".proj_in.weight", ".attn_mask")] = torch.tril(ones)
        apple_key = hf_key_to_apple(key)
        apple[apple_key] = tensor.unsqueeze(1) if apple_key.endswith(".class_embed") else tensor
    return apple


def config_from_apple_arguments(arguments: Mapping[str, Any], **overrides: Any) -> TarFlowConfig:
    """The `TarFlowConfig` of Apple's `transformer_flow.Model(**arguments)` (its constructor's names)."""
    return TarFlowConfig(
        image_size=arguments["img_size"],
        num_channels=arguments["in_channels"],
        patch_size=arguments["patch_size"],
        hidden_size=arguments["channels"],
        num_blocks=arguments["num_blocks"],
        layers_per_block=arguments["layers_per_block"],
        nvp=arguments.get("nvp", True),
        num_classes=arguments.get("num_classes", 0),
        **overrides,
    )


def expected_hf_shapes(config: TarFlowConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a `TarFlowModel(config)` state dict and its shape, without allocating weights."""
    return state_shapes(meta_model(TarFlowModel, config).state_dict())


def expected_apple_shapes(config: TarFlowConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the matching Apple state dict and its shape, in the order Apple's `state_dict()` has them."""
    return state_shapes(hf_to_apple_state_dict(meta_model(TarFlowModel, config).state_dict()))


# ----------------------------------------------------------------------------------------- file names
@dataclass(frozen=True)
class CheckpointName:
    """What Apple's `train.py` writes into a checkpoint's file name."""

    file_name: str
    dataset: str
    patch_size: int
    hidden_size: int
    num_blocks: int
    layers_per_block: int
    noise: str  # the noise std as written ("0.07"), or "uniform" for density models

    @property
    def noise_std(self) -> float:
        # Density models are trained on uniformly dequantized pixels, not Gaussian noise: nothing to denoise.
        return 0.0 if self.noise == "uniform" else float(self.noise)


def parse_checkpoint_name(path: str | os.PathLike) -> CheckpointName | None:
    """Parse Apple's checkpoint file name; None when the name does not follow the pattern.

    ```python
    >>> parse_checkpoint_name("ckpts/afhq_model_8_768_8_8_0.07.pth").noise_std
    0.07
    ```
    """
    name = Path(path).name
    match = _APPLE_FILE_NAME.match(name)
    if match is None:
        return None
    fields = match.groupdict()
    return CheckpointName(
        file_name=name,
        dataset=fields["dataset"],
        patch_size=int(fields["patch_size"]),
        hidden_size=int(fields["hidden_size"]),
        num_blocks=int(fields["num_blocks"]),
        layers_per_block=int(fields["layers_per_block"]),
        noise=fields["noise"],
    )


# ------------------------------------------------------------------------------------------- inference
def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, purpose: str, source: str) -> tuple[int, ...]:
    return shape_of(shapes, key, ndim, source, "apple/ml-tarflow", purpose)


@dataclass(frozen=True)
class _Architecture:
    """What the weights alone say about a model."""

    hidden_size: int
    patch_dim: int
    num_patches: int
    num_blocks: int
    layers_per_block: int
    mlp_ratio: int
    nvp: bool
    num_classes: int


def _read_architecture(shapes: Mapping[str, tuple[int, ...]], source: str) -> _Architecture:
    blocks = key_indices(shapes, r"^blocks\.(\d+)\.")
    if not blocks:
        raise ValueError(
            f"{source} is not an apple/ml-tarflow state dict: it has no 'blocks.N.*' keys "
            f"(its keys: {list_keys(list(shapes))})"
        )
    num_patches, patch_dim = _shape(shapes, "var", 2, "the prior variance, (patches, patch dim)", source)
    hidden_size, proj_in_dim = _shape(shapes, "blocks.0.proj_in.weight", 2, "the patch embedding", source)
    if proj_in_dim != patch_dim:
        raise ValueError(
            f"{source}: 'var' has patch dim {patch_dim} but 'blocks.0.proj_in.weight' takes {proj_in_dim} inputs"
        )
    layers = key_indices(shapes, r"^blocks\.0\.attn_blocks\.(\d+)\.")
    if not layers:
        raise ValueError(f"{source} has no key 'blocks.0.attn_blocks.0.*': no transformer layers in block 0")
    mlp_width, mlp_in = _shape(shapes, "blocks.0.attn_blocks.0.mlp.main.0.weight", 2, "the MLP expansion", source)
    if mlp_in != hidden_size or mlp_width % hidden_size:
        raise ValueError(
            f"{source}: 'blocks.0.attn_blocks.0.mlp.main.0.weight' is {(mlp_width, mlp_in)}, which is not "
            f"(ratio * {hidden_size}, {hidden_size}) for a whole-number MLP ratio"
        )
    out_dim, _ = _shape(shapes, "blocks.0.proj_out.weight", 2, "the affine output projection", source)
    if out_dim not in (patch_dim, 2 * patch_dim):
        raise ValueError(
            f"{source}: 'blocks.0.proj_out.weight' has {out_dim} outputs; expected {2 * patch_dim} (nvp: log-scale "
            f"and shift per patch value) or {patch_dim} (shift only)"
        )
    num_classes = 0
    if "blocks.0.class_embed" in shapes:
        num_classes = _shape(shapes, "blocks.0.class_embed", 3, "the class embedding, (classes, 1, width)", source)[0]
    return _Architecture(
        hidden_size=hidden_size,
        patch_dim=patch_dim,
        num_patches=num_patches,
        num_blocks=blocks[-1] + 1,
        layers_per_block=layers[-1] + 1,
        mlp_ratio=mlp_width // hidden_size,
        nvp=out_dim == 2 * patch_dim,
        num_classes=num_classes,
    )


def _channels_hint(patch_dim: int, name: CheckpointName | None) -> str:
    if name is not None and patch_dim % name.patch_size**2 == 0:
        return f"; the file name's patch size {name.patch_size} means --in-channels {patch_dim // name.patch_size**2}"
    return ""


def _patch_size(patch_dim: int, num_channels: int, explicit: bool, name: CheckpointName | None) -> int:
    """p with patch_dim = C * p**2."""
    where = f"--in-channels {num_channels}" if explicit else f"{num_channels} channels (the default; see --in-channels)"
    per_channel, remainder = divmod(patch_dim, num_channels)
    side = math.isqrt(per_channel)
    if remainder or side * side != per_channel or side == 0:
        raise ValueError(
            f"the weights' patch dimension {patch_dim} is not channels x patch_size**2 for {where}"
            + _channels_hint(patch_dim, name)
        )
    return side


def _resolve_noise_std(noise_std: float | None, name: CheckpointName | None) -> float:
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"--noise-std must be a finite number >= 0, got {noise_std}")
    if name is None:
        if noise_std is None:
            raise ValueError(
                "the training noise is unknown: the file name does not follow Apple's pattern "
                f"{APPLE_TARFLOW_FILE_NAME}; pass --noise-std (the std of the Gaussian noise the model was "
                "trained with, e.g. 0.07 for AFHQ, 0.05 for ImageNet 64, 0.15 for ImageNet 128)"
            )
        return noise_std
    if noise_std is None:
        return name.noise_std
    if name.noise == "uniform":
        if noise_std != 0:
            raise ValueError(
                f"noise std: the file name {name.file_name} says 'uniform' (a density model trained without "
                f"Gaussian noise, noise_std 0) but --noise-std is {noise_std}"
            )
        return 0.0
    # The file name rounds to two decimals, so a flag that agrees to two decimals is the more precise value.
    if f"{noise_std:.2f}" != f"{name.noise_std:.2f}":
        raise ValueError(f"noise std: the file name {name.file_name} says {name.noise} but --noise-std is {noise_std}")
    return noise_std


def _resolve_class_names(
    labels: str | Sequence[str] | None, name: CheckpointName | None, num_classes: int
) -> list[str] | None:
    """Class names for the config (None: the config's generic `class_i`, or none for unconditional models)."""
    if labels is None:
        if name is None or name.dataset not in APPLE_DATASET_LABELS:
            return None
        spec = APPLE_DATASET_LABELS[name.dataset]
        origin = f"the file name's dataset {name.dataset!r}"
        names = resolve_labels(spec)
        if names is None and num_classes:
            raise ValueError(
                f"classes: {origin} is unconditional but the weights have {num_classes} class embeddings "
                "(pass --labels to name them)"
            )
    elif isinstance(labels, str):
        origin = f"--labels {labels}"
        names = resolve_labels(labels)
    else:
        origin = "the given labels"
        names = list(labels)
    if names is None:
        return None
    if len(names) != num_classes:
        have = f"{num_classes} class embeddings" if num_classes else "no class embeddings (unconditional)"
        raise ValueError(f"classes: {origin} names {len(names)} classes but the weights have {have}")
    return names


def infer_config(
    state: Mapping[str, Any],
    *,
    num_channels: int | None = None,
    noise_std: float | None = None,
    labels: str | Sequence[str] | None = None,
    checkpoint_name: CheckpointName | None = None,
    source: str = "the checkpoint",
) -> TarFlowConfig:
    r"""
    The [`TarFlowConfig`] of an Apple state dict, read from its shapes (tensors, meta tensors, or anything with
    a `.shape`: nothing is read from the values).

    From the weights: `hidden_size` (proj_in), `num_blocks`, `layers_per_block`, `num_classes` (class_embed),
    `nvp` (proj_out has 2 * D outputs, else D), `mlp_ratio` (MLP width / hidden size), the patch dimension D and
    the number of patches T (`var` is (T, D)); with `num_channels` C, `patch_size = sqrt(D / C)` and
    `image_size = sqrt(T) * patch_size`. `head_dim` is 64, the only value Apple's code uses.

    Args:
        num_channels (`int`, *optional*): image channels, 3 when not given.
        noise_std (`float`, *optional*): training noise; overrides (and is checked against) the file name.
        labels (`str` or list of `str`, *optional*): `"afhq"`, `"imagenet"`, `"none"`, a JSON file, or the names.
            Default: the file name's dataset (afhq, imagenet; imagenet64 is unconditional).
        checkpoint_name ([`CheckpointName`], *optional*): the parsed file name; its patch size, width, blocks
            and layers must agree with the weights.
        source (`str`): how errors name the checkpoint.

    Raises:
        `ValueError`: naming both values of any contradiction, or the missing, unexpected or mis-shaped keys.

    Example:

    ```python
    >>> state = torch.load("afhq_model_8_768_8_8_0.07.pth", mmap=True, weights_only=True)
    >>> config = infer_config(state, checkpoint_name=parse_checkpoint_name("afhq_model_8_768_8_8_0.07.pth"))
    >>> config.image_size, config.patch_size, config.id2label[0]
    (256, 8, 'cat')
    ```
    """
    shapes = state_shapes(state)
    arch = _read_architecture(shapes, source)
    name = checkpoint_name
    explicit_channels = num_channels is not None
    channels = num_channels if explicit_channels else APPLE_TARFLOW_CHANNELS
    if channels < 1:
        raise ValueError(f"--in-channels must be a positive integer, got {channels}")
    patch_size = _patch_size(arch.patch_dim, channels, explicit_channels, name)
    side = math.isqrt(arch.num_patches)
    if side * side != arch.num_patches:
        raise ValueError(f"{source}: 'var' has {arch.num_patches} patches, which is not a square grid")

    if name is not None:
        checks = (
            (
                "patch size",
                name.patch_size,
                patch_size,
                f" (patch dimension {arch.patch_dim} with {channels} channels)",
            ),
            ("width", name.hidden_size, arch.hidden_size, ""),
            ("blocks", name.num_blocks, arch.num_blocks, ""),
            ("layers per block", name.layers_per_block, arch.layers_per_block, ""),
        )
        contradictions = [
            f"{field}: the file name {name.file_name} says {from_name} but the weights have {from_weights}{detail}"
            for field, from_name, from_weights, detail in checks
            if from_name != from_weights
        ]
        if contradictions:
            hint = _channels_hint(arch.patch_dim, name) if patch_size != name.patch_size else ""
            raise ValueError("; ".join(contradictions) + hint)

    names = _resolve_class_names(labels, name, arch.num_classes)
    config = TarFlowConfig(
        image_size=side * patch_size,
        num_channels=channels,
        patch_size=patch_size,
        hidden_size=arch.hidden_size,
        num_blocks=arch.num_blocks,
        layers_per_block=arch.layers_per_block,
        head_dim=APPLE_HEAD_DIM,
        mlp_ratio=arch.mlp_ratio,
        nvp=arch.nvp,
        num_classes=arch.num_classes,
        noise_std=_resolve_noise_std(noise_std, name),
        id2label=None if names is None else dict(enumerate(names)),
    )
    check_state_dict(state, expected_apple_shapes(config), source, f"the inferred {describe_config(config)}")
    return config


def describe_config(config: TarFlowConfig) -> str:
    """One line: `3x256x256, patch 8, width 768, 8 blocks x 8 layers, 3 classes, noise_std 0.07`."""
    classes = _count(config.num_classes, "class", "classes") if config.num_classes else "unconditional"
    return (
        f"{config.num_channels}x{config.image_size}x{config.image_size}, patch {config.patch_size}, width "
        f"{config.hidden_size}, {_count(config.num_blocks, 'block')} x {_count(config.layers_per_block, 'layer')}, "
        f"{classes}, noise_std {config.noise_std:g}"
    )


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


# ------------------------------------------------------------------------------------------ building models
def _check_values(state: Mapping[str, torch.Tensor], source: str) -> None:
    check_weight_values(state, source)
    for key, mask in state.items():
        if key.endswith(".attn_mask") and not mask.is_meta and not torch.equal(mask, torch.ones_like(mask).tril()):
            raise ValueError(
                f"{source}: {key!r} is not the causal (lower-triangular ones) mask ml-tarflow always uses; "
                "this checkpoint is not a TarFlow model this converter supports"
            )


def model_from_apple_state_dict(
    state: Mapping[str, torch.Tensor], config: TarFlowConfig, source: str = "the checkpoint"
) -> TarFlowModel:
    """A TarFlowModel that uses the tensors of `state` as its weights (no copy: the model is built on the meta
    device and the tensors are assigned). Meta tensors give a meta model, which checks a configuration for free."""
    check_state_dict(state, expected_apple_shapes(config), source, f"the configuration {describe_config(config)}")
    _check_values(state, source)
    model = meta_model(TarFlowModel, config)
    model.load_state_dict(apple_to_hf_state_dict(state), strict=True, assign=True)
    return model.eval()


def load_ml_tarflow_checkpoint(
    path: str | os.PathLike,
    config: TarFlowConfig | None = None,
    *,
    num_channels: int | None = None,
    noise_std: float | None = None,
    labels: str | Sequence[str] | None = None,
) -> TarFlowModel:
    """Build a TarFlowModel with the weights of an Apple `.pth` file, for `config` or (when None) the
    configuration `infer_config` reads from the weights and the file name.

    ```python
    >>> model = load_ml_tarflow_checkpoint("afhq_model_8_768_8_8_0.07.pth")
    >>> model.config.id2label
    {0: 'cat', 1: 'dog', 2: 'wild'}
    ```
    """
    source = f"checkpoint {os.fspath(path)}"
    state = load_apple_state_dict(path)
    if config is None:
        config = infer_config(
            state,
            num_channels=num_channels,
            noise_std=noise_std,
            labels=labels,
            checkpoint_name=parse_checkpoint_name(path),
            source=source,
        )
    elif num_channels is not None or noise_std is not None or labels is not None:
        raise ValueError("pass either a config or num_channels/noise_std/labels to infer one, not both")
    return model_from_apple_state_dict(state, config, source)


# ------------------------------------------------------------------------------------------- conversions
def convert_ml_tarflow_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    num_channels: int | None = None,
    noise_std: float | None = None,
    labels: str | Sequence[str] | None = None,
    overwrite: bool = False,
) -> TarFlowConfig:
    """Convert an Apple `.pth` into a folder that `TarFlowPipeline.from_pretrained(output_dir)` loads (the model
    in its `transformer/` subfolder, as safetensors). Returns the configuration it inferred. `overwrite` replaces
    an earlier conversion's folder, never one holding the inputs or anything a conversion does not write
    (`tarflow_hf.apple_checkpoints.check_output_folder`).

    ```python
    >>> from tarflow_hf.pipeline_tarflow import TarFlowPipeline
    >>> config = convert_ml_tarflow_checkpoint("afhq_model_8_768_8_8_0.07.pth", "tarflow-afhq-256")
    >>> pipeline = TarFlowPipeline.from_pretrained("tarflow-afhq-256")
    ```
    """
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    inputs = {"the checkpoint": checkpoint, "the label file": labels if isinstance(labels, str) else None}
    check_output_folder(output_dir, overwrite, inputs)
    model = load_ml_tarflow_checkpoint(checkpoint, num_channels=num_channels, noise_std=noise_std, labels=labels)
    from .hub import display_name
    from .pipeline_tarflow import TarFlowPipeline  # diffusers is slow to import; only conversions need it

    with atomic_folder(output_dir, overwrite=overwrite, may_replace=replaceable_output(inputs)) as tmp:
        # The card's usage example names the final folder, not the temporary one it is written in.
        TarFlowPipeline(transformer=model).save_pretrained(tmp, model_card={"repo_id": display_name(output_dir)})
    return model.config


def read_tarflow_folder(folder: str | os.PathLike) -> tuple[TarFlowConfig, dict[str, torch.Tensor]]:
    """The config and the exact stored tensors (dtypes as saved) of a converted pipeline or model folder."""
    return read_converted_folder(folder, TarFlowConfig, expected_hf_shapes, TARFLOW.title)


def export_ml_tarflow_checkpoint(
    folder: str | os.PathLike, output_path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a converted folder back as an Apple `.pth`: the same keys, in Apple's order, dtypes, shapes and
    values (the causal masks included) as the checkpoint it came from. `overwrite` replaces an earlier `.pth`,
    never another file nor a file of `folder`.

    ```python
    >>> export_ml_tarflow_checkpoint("tarflow-afhq-256", "afhq_model_8_768_8_8_0.07.pth")
    ```
    """
    output_path = check_output_file(output_path, overwrite, folder)
    config, state = read_tarflow_folder(folder)
    apple = hf_to_apple_state_dict(state)
    return save_apple_state_dict({key: apple[key] for key in expected_apple_shapes(config)}, output_path)


__all__ = [
    "APPLE_DATASET_LABELS",
    "CheckpointName",
    "apple_key_to_hf",
    "apple_to_hf_state_dict",
    "config_from_apple_arguments",
    "convert_ml_tarflow_checkpoint",
    "describe_config",
    "expected_apple_shapes",
    "expected_hf_shapes",
    "export_ml_tarflow_checkpoint",
    "hf_key_to_apple",
    "hf_to_apple_state_dict",
    "infer_config",
    "load_ml_tarflow_checkpoint",
    "model_from_apple_state_dict",
    "non_finite_weights",
    "parse_checkpoint_name",
    "read_tarflow_folder",
]
