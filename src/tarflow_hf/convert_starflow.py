"""Port apple/ml-starflow checkpoints to StarFlowModel / StarFlowPipeline folders and back.

    tarflow-hf convert starflow_3B_t2i_256x256.pth starflow-3b --config starflow_3B_t2i_256x256.yaml
    tarflow-hf convert starflow_3B_t2i_256x256.pth starflow-3b-transformer --transformer-only
    tarflow-hf convert --reverse starflow-3b starflow_again.pth

The architecture (blocks, layers, widths, patch and text sizes, and the training grid, text length and head size
from the deprecated buffers when the checkpoint has them) is read off the weights. What they cannot tell (soft
clip, training noise, latent channels, regulariser weight, and which text encoder and VAE go around the model)
comes from Apple's yaml (`--config`, the `configs/*.yaml` format: `arguments:` then `- key: value` lines, lists
space-separated), read as Apple's `load_model_config` reads it: a key the yaml does not set takes the default of
Apple's `train.py` parser. Without a yaml, the released `configs/starflow_3B_t2i_256x256.yaml` values are assumed
and printed. A yaml value (or a default it falls back to) that contradicts the weights is an error naming which
it is. Checkpoints are loaded with `torch.load(weights_only=True, mmap=True)` and the model is built on the meta
device and takes the memory-mapped tensors as they are, so a conversion holds a single copy of the weights.

Key layout of Apple's `transformer_flow.Model` state dict and ours:

    var                                          -> (dropped: deprecated, all ones, never read)
    feat_rope.freqs_cos, feat_rope.freqs_sin     -> (dropped: deprecated, zeros, never read)
    blocks.{i}.attn_mask                         -> (dropped: deprecated, the causal mask, never read)
    blocks.{i}.attn_blocks.{j}.attention.*       -> blocks.{i}.layers.{j}.attention.*
    blocks.{i}.attn_blocks.{j}.mlp.norm          -> blocks.{i}.layers.{j}.mlp.norm
    blocks.{i}.attn_blocks.{j}.mlp.main.0 / .2   -> blocks.{i}.layers.{j}.mlp.fc1 / fc2
    blocks.{i}.{sos_embed, proj_in, proj_out, proj_txt, final_norm}  -> unchanged

`--reverse` restores the dropped buffers exactly (ones, the lower-triangular mask, one shared zero tensor), so
.pth -> folder -> .pth gives back the same tensors.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import register_auto_classes
from .apple_checkpoints import (
    check_input_file,
    check_output_file,
    check_output_folder,
    check_state_dict,
    check_weight_values,
    is_starflow_state_dict,
    key_indices,
    load_apple_state_dict,
    meta_model,
    read_converted_folder,
    replaceable_output,
    save_apple_state_dict,
    shape_of,
    state_shapes,
)
from .configuration_starflow import StarFlowConfig
from .fileio import atomic_folder
from .modeling_starflow import StarFlowModel
from .registry import STARFLOW, STARFLOW_TEXT_ENCODER, STARFLOW_VAE

VAE_DOWNSAMPLING = 8
APPLE_STARFLOW_REPOSITORY = "https://github.com/apple/ml-starflow"
RELEASED_YAML_NAME = "configs/starflow_3B_t2i_256x256.yaml"
# The released yaml (plus the parser default head_dim 64): what a checkpoint without `--config` is assumed to be.
RELEASED_YAML: dict[str, Any] = {
    "img_size": 256,
    "txt_size": 128,
    "channel_size": 4,
    "patch_size": 1,
    "channels": 3072,
    "head_dim": 64,
    "layers_per_block": [2, 2, 2, 2, 2, 24],
    "noise_std": 0.3,
    "soft_clip": 4.0,
    "latent_norm_regularization": 1e-4,
    "text": STARFLOW_TEXT_ENCODER,
    "vae": STARFLOW_VAE,
}
# Apple's parser defaults (train.py `get_tarflow_parser`) for the settings read here: a yaml without a key means
# this value, as in Apple's own loading.
APPLE_PARSER_DEFAULTS: dict[str, Any] = {
    "img_size": 32,
    "txt_size": 0,
    "channel_size": 3,
    "patch_size": 4,
    "channels": 512,
    "top_block_channels": None,
    "head_dim": 64,
    "noise_std": 0.3,
    "soft_clip": 0.0,
    "latent_norm_regularization": 0.0,
    "sos": 0,
    "seq_order": "R2L",
    "rope": 0,
    "use_softplus": 0,
    "cond_top_only": 0,
    "use_final_norm": 0,
}
# yaml flags this port implements only at one value (the released one); anything else is refused.
SUPPORTED_FLAGS: dict[str, Any] = {
    "sos": 1,
    "rope": 1,
    "use_softplus": 1,
    "cond_top_only": 1,
    "use_final_norm": 1,
    "seq_order": "L2R",
    "use_swiglu": 0,
    "use_qk_norm": 0,
    "use_post_norm": 0,
    "use_bias": 1,
    "norm_type": "layer_norm",
    "learnable_self_denoiser": 0,
    "temporal_causal": 0,
    "mix_aspect": 0,
    "fps_cond": 0,
}
_DROPPED = re.compile(r"^(var|blocks\.\d+\.attn_mask|feat_rope\.freqs_(cos|sin))$")
_RENAMES = [(".attn_blocks.", ".layers."), (".mlp.main.0.", ".mlp.fc1."), (".mlp.main.2.", ".mlp.fc2.")]


# ------------------------------------------------------------------------------------------------- yaml
def _yaml_value(text: str) -> Any:
    text = text.strip().strip("'\"")
    if " " in text:
        return [_yaml_value(part) for part in text.split()]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None if text in ("None", "null", "~", "") else text


def read_apple_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Apple's config yaml (`arguments:` then `- key: value` lines) as a dict. Values are parsed as Apple's
    `load_model_config` does, as command-line flags: numbers, and space-separated lists (`layers_per_block: 2 2
    24`). A file without the `arguments:` line is not Apple's format (Apple's loader reads that key only)."""
    path = check_input_file(path, "config")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"config {path} is not a text file; expected Apple's yaml (configs/*.yaml)") from None
    values: dict[str, Any] = {}
    has_arguments = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line == "arguments:":
            has_arguments = True
        elif line:
            match = re.fullmatch(r"-?\s*([A-Za-z_][\w-]*)\s*:\s*(.*)", line)
            if match is None:
                raise ValueError(f"{path}:{number}: expected '- key: value', got {raw.strip()!r}")
            values[match.group(1)] = _yaml_value(match.group(2))
    if not has_arguments:
        raise ValueError(
            f"config {path} has no 'arguments:' line: it is not an apple/ml-starflow config (configs/*.yaml: "
            "'arguments:' then '- key: value' lines)"
        )
    return values


@dataclass(frozen=True)
class AppleSettings:
    """Apple's training settings of a checkpoint: a yaml's values over Apple's parser defaults, remembering which
    keys the yaml set, so that an error names the yaml only for what it says."""

    values: Mapping[str, Any]
    given: frozenset[str]
    source: str | None  # "config X.yaml"; None: the released yaml's values, assumed (the weights are not checked)

    @classmethod
    def from_yaml(cls, yaml_dict: Mapping[str, Any], source: str) -> AppleSettings:
        return cls({**APPLE_PARSER_DEFAULTS, **yaml_dict}, frozenset(yaml_dict), source)

    @classmethod
    def released(cls) -> AppleSettings:
        return cls({**APPLE_PARSER_DEFAULTS, **SUPPORTED_FLAGS, **RELEASED_YAML}, frozenset(RELEASED_YAML), None)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def origin(self, key: str) -> str:
        """Where the value of `key` comes from, with the value: `config c.yaml says head_dim=32`, or that Apple's
        default applies because the yaml does not set it."""
        value = self.values.get(key)
        if self.source is None:
            return f"the released yaml's {key}={value}"
        if key in self.given:
            return f"{self.source} says {key}={value}"
        return f"{self.source} does not set {key}, so Apple's default {key}={value} applies"

    def number(self, key: str) -> float:
        """The value of `key` as a finite number >= 0 (noise, clip and loss weights)."""
        value = self.values.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise ValueError(f"{self.origin(key)}; expected a finite number >= 0")
        return float(value)

    def size(self, key: str) -> int | None:
        """The value of `key` as a whole number (None when unset)."""
        value = self.values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{self.origin(key)}; expected a whole number")
        return value


def apple_settings(config_yaml: str | os.PathLike | Mapping[str, Any] | None) -> AppleSettings:
    """The settings of a yaml file, of an already parsed yaml dict, or (None) the released yaml's."""
    if config_yaml is None:
        return AppleSettings.released()
    if isinstance(config_yaml, Mapping):
        return AppleSettings.from_yaml(config_yaml, "the given yaml settings")
    return AppleSettings.from_yaml(read_apple_yaml(config_yaml), f"config {os.fspath(config_yaml)}")


# ----------------------------------------------------------------------------------------- key mapping
def apple_key_to_hf(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def hf_key_to_apple(key: str) -> str:
    for old, new in _RENAMES:
        key = key.replace(new, old)
    return key


def apple_to_hf_state_dict(apple: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Apple's keys and drop its deprecated buffers; every other tensor is kept as it is (no copy)."""
    return {apple_key_to_hf(key): tensor for key, tensor in apple.items() if not _DROPPED.match(key)}


def deprecated_buffers(config: StarFlowConfig, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Apple's never-read buffers for `config`: `var` (P^2, D) ones; every block's `attn_mask` (P^2 + L, P^2 + L)
    lower-triangular ones; `feat_rope.freqs_cos`/`_sin` (L + P^2, head_dim) zeros, one tensor for both as in
    Apple's module (so `torch.save` stores it once)."""
    positions = config.num_patches + config.max_text_length
    mask = torch.ones(positions, positions, dtype=dtype).tril()
    freqs = torch.zeros(positions, config.head_dim, dtype=dtype)
    buffers = {"var": torch.ones(config.num_patches, config.patch_dim, dtype=dtype)}
    buffers.update({f"blocks.{i}.attn_mask": mask.clone() for i in range(config.num_blocks)})
    buffers.update({"feat_rope.freqs_cos": freqs, "feat_rope.freqs_sin": freqs})
    return buffers


def _apple_block_order(key: str) -> tuple:
    """Sort key giving Apple's `state_dict()` order within a block: own parameter and buffer, then children."""
    parts = key.split(".")
    children = ["sos_embed", "attn_mask", "proj_in", "proj_out", "proj_txt", "attn_blocks", "final_norm"]
    rank = children.index(parts[2]) if parts[2] in children else len(children)
    return (int(parts[1]), rank, int(parts[3]) if parts[2] == "attn_blocks" else 0)


def hf_to_apple_state_dict(state: Mapping[str, torch.Tensor], config: StarFlowConfig) -> dict[str, torch.Tensor]:
    """Apple's keys, in Apple's order, with the deprecated buffers restored (in the weights' dtype)."""
    dtype = next(iter(state.values())).dtype if state else torch.float32
    buffers = deprecated_buffers(config, dtype)
    # The model's own key order (safetensors files list keys alphabetically), then anything unexpected.
    order = [key for key in meta_model(StarFlowModel, config).state_dict() if key in state]
    order += [key for key in state if key not in set(order)]
    blocks = {hf_key_to_apple(key): state[key] for key in order}
    blocks.update({key: value for key, value in buffers.items() if key.startswith("blocks.")})
    apple = {"var": buffers["var"]}
    for key in sorted(blocks, key=_apple_block_order):  # stable: keeps each module's parameter order
        apple[key] = blocks[key]
    apple["feat_rope.freqs_cos"] = buffers["feat_rope.freqs_cos"]
    apple["feat_rope.freqs_sin"] = buffers["feat_rope.freqs_sin"]
    return apple


# --------------------------------------------------------------------------------------- configuration
def expected_hf_shapes(config: StarFlowConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a `StarFlowModel(config)` state dict and its shape, without allocating weights (even 3B)."""
    return state_shapes(meta_model(StarFlowModel, config).state_dict())


def expected_apple_shapes(config: StarFlowConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the matching Apple state dict with its shape, in Apple's order."""
    return state_shapes(hf_to_apple_state_dict(meta_model(StarFlowModel, config).state_dict(), config))


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
    return shape_of(shapes, key, ndim, "the checkpoint", "apple/ml-starflow transformer_flow.Model")


def _yaml_text(value: Any) -> str:
    """A value as a yaml line writes it (lists space-separated)."""
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _contradiction(settings: AppleSettings, key: str, from_weights: str, fix: Any) -> ValueError:
    """A yaml value (or the default a yaml falls back to) that the weights contradict: which it is, both values,
    and for a default the line that would set it."""
    hint = "" if key in settings.given else f"; add '- {key}: {_yaml_text(fix)}' to the yaml"
    return ValueError(f"{settings.origin(key)}, but the checkpoint's weights give {from_weights}{hint}")


def _agree(key: str, from_weights: Any, from_yaml: Any, settings: AppleSettings) -> Any:
    """The weights' value, checked against the settings' (unless assumed: the released yaml's values only fill in
    what the weights do not tell); the settings' when the weights do not tell."""
    if from_weights is None:
        return from_yaml
    if settings.source is not None and from_yaml is not None and from_yaml != from_weights:
        raise _contradiction(settings, key, f"{key}={_yaml_text(from_weights)}", from_weights)
    return from_weights


def _check_flags(settings: AppleSettings) -> None:
    for flag, supported in SUPPORTED_FLAGS.items():
        value = settings.get(flag, supported)
        if value is not None and value != supported:
            raise ValueError(
                f"{settings.origin(flag)}; this port implements apple/ml-starflow's released text-to-image "
                f"architecture only ({flag}={supported!r})"
            )
    if settings.get("use_pretrained_lm") not in (None, "None"):
        raise ValueError("use_pretrained_lm models (a Gemma deep block) are not supported by this port")


def _transformer_sizes(shapes: Mapping[str, tuple[int, ...]], settings: AppleSettings) -> dict[str, Any]:
    """Blocks, layers, widths and text width, read off the weights (and checked against the settings)."""
    blocks = key_indices(shapes, r"^blocks\.(\d+)\.")
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"the checkpoint's blocks are numbered {blocks}; expected blocks.0 .. blocks.N-1")
    layers = [len(key_indices(shapes, rf"^blocks\.{i}\.attn_blocks\.(\d+)\.")) for i in blocks]
    deep = blocks[-1]
    width = _shape(shapes, "blocks.0.proj_in.weight", 2)[0]
    deep_width = _shape(shapes, f"blocks.{deep}.proj_in.weight", 2)[0]
    fc1 = _shape(shapes, "blocks.0.attn_blocks.0.mlp.main.0.weight", 2)[0] if layers[0] else 4 * width
    text_key = f"blocks.{deep}.proj_txt.weight"
    yaml_layers = settings.get("layers_per_block")
    if isinstance(yaml_layers, int):  # Apple repeats a single value for every block
        yaml_layers = [yaml_layers] * len(blocks)
    _agree("layers_per_block", layers, yaml_layers, settings)
    _agree("channels", width, settings.size("channels"), settings)
    if settings.get("top_block_channels") not in (None, 0):
        _agree("top_block_channels", deep_width, settings.size("top_block_channels"), settings)
    return {
        "hidden_size": width,
        "deep_hidden_size": deep_width,
        "layers_per_block": layers,
        "mlp_ratio": fc1 // width,
        "text_hidden_size": _shape(shapes, text_key, 2)[1] if text_key in shapes else 0,
    }


def _patch_size(patch_dim: int, settings: AppleSettings) -> int:
    """p with the token width = channel_size * p**2."""
    channels = settings.size("channel_size")
    patch = math.isqrt(patch_dim // channels) if channels and patch_dim % channels == 0 else 0
    if not patch or patch * patch * channels != patch_dim:
        raise ValueError(
            f"{settings.origin('channel_size')}, but the checkpoint's token width {patch_dim} is not channel_size "
            "times a square patch"
        )
    return _agree("patch_size", patch, settings.size("patch_size"), settings)


def _grid(grid_tokens: int | None, patch: int, settings: AppleSettings) -> int:
    """The side of the training latent grid: from the `var` buffer (grid**2 rows), else from img_size."""
    grid = math.isqrt(grid_tokens) if grid_tokens is not None else None
    if grid is not None and grid * grid != grid_tokens:
        raise ValueError(f"'var' has {grid_tokens} rows, not a square grid")
    img_size = settings.size("img_size")
    yaml_grid = img_size // VAE_DOWNSAMPLING // patch if img_size else None
    if grid is None:
        if yaml_grid is None:
            raise ValueError(
                "the checkpoint has no 'var' buffer and no img_size was given: the training size is unknown"
            )
        return yaml_grid
    if settings.source is not None and yaml_grid is not None and yaml_grid != grid:
        pixels = grid * patch * VAE_DOWNSAMPLING
        raise _contradiction(
            settings, "img_size", f"a {grid}x{grid} latent grid of patch {patch} ({pixels} pixels)", pixels
        )
    return grid


def _latent_sizes(shapes: Mapping[str, tuple[int, ...]], settings: AppleSettings, has_text: bool) -> dict[str, Any]:
    """Latent channels, patch, training grid, head size and text length. Apple's deprecated buffers, when the
    checkpoint has them, give the grid (`var`), the text length (`attn_mask`) and the head size (`feat_rope`)."""
    positions = shapes["blocks.0.attn_mask"][0] if "blocks.0.attn_mask" in shapes else None
    head_dim = shapes["feat_rope.freqs_cos"][1] if "feat_rope.freqs_cos" in shapes else None
    head_dim = _agree("head_dim", head_dim, settings.size("head_dim"), settings)
    patch = _patch_size(_shape(shapes, "blocks.0.proj_in.weight", 2)[1], settings)
    grid = _grid(shapes["var"][0] if "var" in shapes else None, patch, settings)
    text_length = positions - grid * grid if positions is not None else None
    text_length = _agree("txt_size", text_length, settings.size("txt_size"), settings) if has_text else 0
    return {
        "sample_size": grid * patch,
        "in_channels": settings.size("channel_size"),
        "patch_size": patch,
        "head_dim": head_dim,
        "max_text_length": text_length or 0,
    }


def config_from_settings(state_or_shapes: Mapping[str, Any], settings: AppleSettings) -> StarFlowConfig:
    """The StarFlowConfig of an Apple state dict (its tensors, or key -> shape) trained with `settings`.
    Contradictions between the two raise ValueError naming the yaml key (or Apple's default)."""
    shapes = {
        key: tuple(value.shape) if hasattr(value, "shape") else tuple(value) for key, value in state_or_shapes.items()
    }
    _check_flags(settings)
    sizes = _transformer_sizes(shapes, settings)
    return StarFlowConfig(
        **sizes,
        **_latent_sizes(shapes, settings, has_text=sizes["text_hidden_size"] > 0),
        soft_clip=settings.number("soft_clip"),
        noise_std=settings.number("noise_std"),
        latent_norm_regularization=settings.number("latent_norm_regularization"),
    )


def starflow_config_from_apple(
    state_or_shapes: Mapping[str, Any], yaml_dict: Mapping[str, Any] | None = None, source: str = "the yaml"
) -> StarFlowConfig:
    """The StarFlowConfig of an Apple state dict, from its keys and shapes (its tensors, or key -> shape) and
    Apple's yaml settings (`yaml_dict`, as `read_apple_yaml` returns them, named `source` in errors;
    None: the released 3B yaml's values). Contradictions between the two raise ValueError."""
    settings = AppleSettings.released() if yaml_dict is None else AppleSettings.from_yaml(yaml_dict, source)
    return config_from_settings(state_or_shapes, settings)


def describe_config(config: StarFlowConfig) -> str:
    parameters = meta_model(StarFlowModel, config).num_parameters()
    return (
        f"{config.in_channels}x{config.sample_size}x{config.sample_size} latents, patch {config.patch_size}, "
        f"{config.num_blocks} blocks {config.layers_per_block}, width {config.hidden_size}/{config.deep_hidden_size}, "
        f"head_dim {config.head_dim}, text {config.max_text_length}x{config.text_hidden_size}, "
        f"{parameters / 1e6:.1f}M parameters"
    )


# ---------------------------------------------------------------------------------------------- loading
def model_from_apple_state_dict(
    state: Mapping[str, torch.Tensor], config: StarFlowConfig, source: str = "the checkpoint"
) -> StarFlowModel:
    """A StarFlowModel that uses the tensors of `state` as its weights (no copy: built on the meta device, the
    tensors assigned). Apple's deprecated buffers are optional (older or stripped files may lack them)."""
    expected = expected_apple_shapes(config)
    for key in [key for key in expected if _DROPPED.match(key) and key not in state]:
        expected.pop(key)
    check_state_dict(state, expected, source, f"the configuration {describe_config(config)}")
    check_weight_values(state, source)
    model = meta_model(StarFlowModel, config)
    model.load_state_dict(apple_to_hf_state_dict(state), strict=True, assign=True)
    return model.eval()


def assumed_settings_note() -> str:
    """What a conversion without `--config` assumes (the settings the weights cannot tell)."""
    shown = ("noise_std", "soft_clip", "channel_size", "latent_norm_regularization", "head_dim", "img_size", "txt_size")
    values = ", ".join(f"{key} {RELEASED_YAML[key]}" for key in shown)
    return f"no --config given: assuming the released {RELEASED_YAML_NAME} values ({values})"


def _settings(config_yaml: str | os.PathLike | Mapping[str, Any] | None, warn_assumed: bool) -> AppleSettings:
    if config_yaml is None and warn_assumed:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(assumed_settings_note())
    return apple_settings(config_yaml)


def _load(path: str | os.PathLike, settings: AppleSettings) -> StarFlowModel:
    source = f"checkpoint {os.fspath(path)}"
    state = load_apple_state_dict(path)
    if not is_starflow_state_dict(state):
        raise ValueError(
            f"{source} is not an apple/ml-starflow checkpoint (no start tokens or final norms among its keys: an "
            "ml-tarflow checkpoint converts with `tarflow-hf convert`, which recognises both)"
        )
    return model_from_apple_state_dict(state, config_from_settings(state, settings), source)


def load_ml_starflow_checkpoint(
    path: str | os.PathLike,
    config_yaml: str | os.PathLike | Mapping[str, Any] | None = None,
    *,
    warn_assumed: bool = True,
) -> StarFlowModel:
    """A StarFlowModel with the weights of an Apple `.pth`, its configuration read from the weights and Apple's
    yaml (a path or an already parsed dict; None: the released 3B yaml's values, with a warning unless
    `warn_assumed=False`).

    ```python
    >>> model = load_ml_starflow_checkpoint("ckpts/starflow_3B_t2i_256x256.pth", "configs/starflow_3B_t2i_256x256.yaml")
    ```
    """
    return _load(path, _settings(config_yaml, warn_assumed))


# ------------------------------------------------------------------------------------------ conversions
def conversion_note(checkpoint: str | os.PathLike) -> str:
    """What a converted folder is (its card's description): Apple's tensors, renamed, in another file format."""
    return (
        f"A format conversion of Apple's {STARFLOW.title} checkpoint `{Path(checkpoint).name}` (code and weights: "
        f"[apple/ml-starflow]({APPLE_STARFLOW_REPOSITORY})) for tarflow-hf. The tensors are Apple's, unchanged; only "
        "their names and file format differ, and `tarflow-hf convert --reverse` writes the original `.pth` back."
    )


def _write_model_folder(
    model: StarFlowModel, folder: Path, checkpoint: Path, license_file: str | os.PathLike | None, shown_as: str
) -> None:
    """The converted model with its code and `auto_map` (so `AutoModel`, with `trust_remote_code` where tarflow-hf
    is not installed, loads it), the license text when given, and the model card (`tarflow_hf.hub`'s, for a bare
    model folder, naming the folder `shown_as`)."""
    from .hub import model_folder_card

    register_auto_classes()  # save_pretrained writes the code and `auto_map` of registered classes only
    model.save_pretrained(folder)
    if license_file is not None:
        shutil.copyfile(license_file, folder / "LICENSE")
    card = model_folder_card(model, repo_id=shown_as, description=conversion_note(checkpoint), folder=folder)
    card.save(folder / "README.md")


def _prepare(
    checkpoint: Path,
    output_dir: Path,
    config_yaml: Any,
    license_file: Any,
    overwrite: bool,
    warn_assumed: bool,
    **local: Any,
) -> tuple[AppleSettings, dict[str, Any]]:
    """What every conversion checks before the (long) loading: the license file, the yaml, and that the destination
    may be written without touching any input (the checkpoint, yaml, license file and `local` component folders),
    which it returns with the settings."""
    if license_file is not None:
        check_input_file(license_file, "license file")
    settings = _settings(config_yaml, warn_assumed)
    config_file = None if isinstance(config_yaml, Mapping) else config_yaml
    inputs = {"the checkpoint": checkpoint, "the config": config_file, "the license file": license_file, **local}
    check_output_folder(output_dir, overwrite, inputs)
    return settings, inputs


def convert_ml_starflow_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config_yaml: str | os.PathLike | Mapping[str, Any] | None = None,
    license_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    warn_assumed: bool = True,
) -> StarFlowConfig:
    """Convert an Apple `.pth` into a model folder (`config.json`, `model.safetensors`, the model's code, a model
    card, and the license text when `license_file` is given), written atomically. `overwrite` replaces an earlier
    conversion's folder, never one holding the inputs or anything a conversion does not write. Returns the
    configuration."""
    from .hub import display_name

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    settings, inputs = _prepare(checkpoint, output_dir, config_yaml, license_file, overwrite, warn_assumed)
    model = _load(checkpoint, settings)
    with atomic_folder(output_dir, overwrite=overwrite, may_replace=replaceable_output(inputs)) as tmp:
        _write_model_folder(model, tmp, checkpoint, license_file, display_name(output_dir))
    return model.config


def _component_name(given: str | None, settings: AppleSettings, key: str, released: str) -> tuple[str, str]:
    """A pipeline component's name and where it comes from: the flag, else the yaml's `key` (Apple's code loads
    what its yaml names), else Apple's released choice."""
    if given:
        return given, ""
    if settings.source is not None and settings.get(key):
        return str(settings.get(key)), f", named by {settings.source}'s {key!r}"
    return released, ""


def _load_component(kind: str, load: Any, name: str, origin: str = "") -> Any:
    try:
        return load(name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        flag = "--text-encoder" if kind != "VAE" else "--vae"
        raise ValueError(
            f"could not load the {kind} {name!r}{origin} ({first_line}); give a local folder with {flag}, or convert "
            "the transformer alone with --transformer-only"
        ) from None


def load_pipeline_components(
    text_encoder: str | None = None, vae: str | None = None, settings: AppleSettings | None = None
) -> dict[str, Any]:
    """The components around a STARFlow transformer: T5's encoder (only the encoder's weights are loaded) and its
    tokenizer from `text_encoder`, and a diffusers AutoencoderKL from `vae`; by default what the yaml `settings`
    name (`text`, `vae`), else Apple's released choices."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    settings = settings or AppleSettings.released()
    text_encoder, text_origin = _component_name(text_encoder, settings, "text", STARFLOW_TEXT_ENCODER)
    vae, vae_origin = _component_name(vae, settings, "vae", STARFLOW_VAE)
    return {
        "text_encoder": _load_component("text encoder", T5EncoderModel.from_pretrained, text_encoder, text_origin),
        "tokenizer": _load_component("tokenizer", AutoTokenizer.from_pretrained, text_encoder, text_origin),
        "vae": _load_component("VAE", AutoencoderKL.from_pretrained, vae, vae_origin),
    }


def convert_ml_starflow_pipeline(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config_yaml: str | os.PathLike | Mapping[str, Any] | None = None,
    license_file: str | os.PathLike | None = None,
    text_encoder: str | None = None,
    vae: str | None = None,
    transformer_only: bool = False,
    overwrite: bool = False,
    warn_assumed: bool = True,
) -> StarFlowConfig:
    """Convert an Apple `.pth` into a `StarFlowPipeline` folder (`StarFlowPipeline.from_pretrained(output_dir)`):
    the converted transformer, T5's encoder and tokenizer from `text_encoder`, the VAE from `vae` (default: what
    the yaml names, else Apple's released choices), the model card and (with `license_file`) the license as
    `LICENSE`. With `transformer_only`, `output_dir/transformer/` alone (with its card and license). Written
    atomically; the destination is checked and the components are loaded before anything is written."""
    from .hub import display_name

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    local = {} if transformer_only else {"the text encoder": text_encoder, "the VAE": vae}
    settings, inputs = _prepare(checkpoint, output_dir, config_yaml, license_file, overwrite, warn_assumed, **local)
    model = _load(checkpoint, settings)
    components = None if transformer_only else load_pipeline_components(text_encoder, vae, settings)
    shown_as = display_name(output_dir)
    with atomic_folder(output_dir, overwrite=overwrite, may_replace=replaceable_output(inputs)) as tmp:
        if components is None:
            _write_model_folder(model, tmp / "transformer", checkpoint, license_file, f"{shown_as}/transformer")
        else:  # the pipeline's card (tarflow_hf.hub), told that this is a conversion, and checking for LICENSE
            from .pipeline_starflow import StarFlowPipeline

            if license_file is not None:
                shutil.copyfile(license_file, tmp / "LICENSE")
            card = {"description": conversion_note(checkpoint), "repo_id": shown_as}
            StarFlowPipeline(transformer=model, **components).save_pretrained(tmp, model_card=card)
    return model.config


# ---------------------------------------------------------------------------------------------- reverse
def read_starflow_folder(folder: str | os.PathLike) -> tuple[StarFlowConfig, dict[str, torch.Tensor]]:
    """The config and the exact stored tensors of a converted (or saved) StarFlow pipeline or model folder."""
    return read_converted_folder(folder, StarFlowConfig, expected_hf_shapes, STARFLOW.title)


def export_ml_starflow_checkpoint(
    model_or_folder: StarFlowModel | str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a StarFlowModel (or a converted folder) as an Apple `.pth`: Apple's keys and order, the weights as
    they are, and the deprecated buffers restored, so that `load_state_dict` in Apple's code takes it as is.
    `overwrite` replaces an earlier `.pth`, never another file nor a file of the folder."""
    in_memory = isinstance(model_or_folder, StarFlowModel)
    path = check_output_file(path, overwrite, None if in_memory else model_or_folder)
    if in_memory:
        config, state = model_or_folder.config, {k: v.detach() for k, v in model_or_folder.state_dict().items()}
    else:
        config, state = read_starflow_folder(model_or_folder)
    return save_apple_state_dict(hf_to_apple_state_dict(state, config), path)


__all__ = [
    "AppleSettings",
    "apple_settings",
    "apple_to_hf_state_dict",
    "config_from_settings",
    "conversion_note",
    "convert_ml_starflow_checkpoint",
    "convert_ml_starflow_pipeline",
    "deprecated_buffers",
    "describe_config",
    "expected_apple_shapes",
    "expected_hf_shapes",
    "export_ml_starflow_checkpoint",
    "hf_to_apple_state_dict",
    "load_ml_starflow_checkpoint",
    "load_pipeline_components",
    "read_apple_yaml",
    "read_starflow_folder",
    "starflow_config_from_apple",
]
