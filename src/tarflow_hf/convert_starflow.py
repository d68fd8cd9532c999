"""Port apple/ml-starflow checkpoints to StarFlowModel folders and back.

    python -m tarflow_hf.convert_starflow starflow_3B_t2i_256x256.pth starflow-3b --config starflow_3B_t2i_256x256.yaml
    python -m tarflow_hf.convert_starflow --reverse starflow-3b starflow_again.pth

The architecture (blocks, layers, widths, patch and text sizes, and the training grid, text length and head size
from the deprecated buffers when the checkpoint has them) is read off the weights. What they cannot tell (soft
clip, training noise, latent channels, regulariser weight) comes from Apple's yaml (`--config`, the
`configs/*.yaml` format: `- key: value` lines, lists space-separated); without one, the released
`configs/starflow_3B_t2i_256x256.yaml` values are assumed and printed. A yaml value that contradicts the weights
is an error. Checkpoints are loaded with `torch.load(weights_only=True, mmap=True)` and the model is built on the
meta device and takes the memory-mapped tensors as they are, so a conversion holds a single copy of the weights.

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

import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import register_auto_classes
from .configuration_starflow import StarFlowConfig
from .convert import (
    check_finite,
    check_folder,
    check_state_dict,
    is_tarflow_folder,
    load_apple_state_dict,
    meta_model,
    read_model_config,
    state_shapes,
)
from .fileio import atomic_file, atomic_folder
from .modeling_starflow import StarFlowModel
from .registry import APPLE_AMLR, STARFLOW_TEXT_ENCODER, STARFLOW_VAE

VAE_DOWNSAMPLING = 8
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
LICENSE_NOTE = APPLE_AMLR.note


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
    """Apple's config yaml (`arguments:` then `- key: value` lines) as a dict. Values are parsed as `sample.py`
    does, as command-line flags: numbers, and space-separated lists (`layers_per_block: 2 2 24`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config not found: {path}")
    values: dict[str, Any] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line or line == "arguments:":
            continue
        match = re.fullmatch(r"-?\s*([A-Za-z_][\w-]*)\s*:\s*(.*)", line)
        if match is None:
            raise ValueError(f"{path}:{number}: expected '- key: value', got {raw.strip()!r}")
        values[match.group(1)] = _yaml_value(match.group(2))
    return values


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


def _block_indices(shapes: Mapping[str, Any], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(match.group(1)) for key in shapes if (match := regex.match(key))})


def _shape_of(shapes: Mapping[str, Any], key: str, ndim: int) -> tuple[int, ...]:
    if key not in shapes:
        raise ValueError(
            f"the checkpoint has no {key!r}; is it an apple/ml-starflow transformer_flow.Model state dict?"
        )
    shape = tuple(shapes[key])
    if len(shape) != ndim:
        raise ValueError(f"{key!r} has shape {shape}; expected {ndim} dimensions")
    return shape


def _agree(name: str, from_weights: Any, from_yaml: Any, source: str | None) -> Any:
    """The weights' value, checked against the yaml's (`source` None: an assumed yaml, not checked); or the
    yaml's when the weights do not tell."""
    if from_weights is None:
        return from_yaml
    if source is not None and from_yaml is not None and from_yaml != from_weights:
        raise ValueError(f"{source} says {name}={from_yaml}, but the checkpoint's weights give {from_weights}")
    return from_weights


def _check_flags(settings: Mapping[str, Any]) -> None:
    for flag, supported in SUPPORTED_FLAGS.items():
        value = settings.get(flag, supported)
        if value is not None and value != supported:
            raise ValueError(
                f"the config sets {flag}={value!r}; this port implements apple/ml-starflow's released text-to-image "
                f"architecture only ({flag}={supported!r})"
            )
    if settings.get("use_pretrained_lm") not in (None, "None"):
        raise ValueError("use_pretrained_lm models (a Gemma deep block) are not supported by this port")


def starflow_config_from_apple(
    state_shapes: Mapping[str, Any], yaml_dict: Mapping[str, Any] | None = None, source: str = "the yaml"
) -> StarFlowConfig:
    """The StarFlowConfig of an Apple state dict, from its keys and shapes (`state_shapes`: key -> shape, or
    tensors) and Apple's yaml settings (`yaml_dict`, as `read_apple_yaml` returns them; None: the released 3B
    yaml's values). Contradictions between the two raise ValueError."""
    shapes = {
        key: tuple(value.shape) if hasattr(value, "shape") else tuple(value) for key, value in state_shapes.items()
    }
    settings = {**APPLE_PARSER_DEFAULTS, **SUPPORTED_FLAGS, **RELEASED_YAML}
    if yaml_dict is not None:
        settings = {**APPLE_PARSER_DEFAULTS, **yaml_dict}
    else:  # the released values fill in what the weights cannot tell; the architecture is the weights' own
        source = None
    _check_flags(settings)
    blocks = _block_indices(shapes, r"^blocks\.(\d+)\.")
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"the checkpoint's blocks are numbered {blocks}; expected blocks.0 .. blocks.N-1")
    layers = [len(_block_indices(shapes, rf"^blocks\.{i}\.attn_blocks\.(\d+)\.")) for i in blocks]
    deep = blocks[-1]
    width, patch_dim = _shape_of(shapes, "blocks.0.proj_in.weight", 2)
    deep_width = _shape_of(shapes, f"blocks.{deep}.proj_in.weight", 2)[0]
    fc1 = _shape_of(shapes, "blocks.0.attn_blocks.0.mlp.main.0.weight", 2)[0] if layers[0] else 4 * width
    text_hidden = (
        _shape_of(shapes, f"blocks.{deep}.proj_txt.weight", 2)[1] if f"blocks.{deep}.proj_txt.weight" in shapes else 0
    )
    yaml_layers = settings.get("layers_per_block")
    if isinstance(yaml_layers, int):  # Apple repeats a single value for every block
        yaml_layers = [yaml_layers] * len(blocks)
    layers = _agree("layers_per_block", layers, yaml_layers, source)
    _agree("channels", width, settings.get("channels"), source)
    if settings.get("top_block_channels") not in (None, 0):
        _agree("top_block_channels", deep_width, settings["top_block_channels"], source)

    # The deprecated buffers give the training grid, the text length and the head size exactly.
    grid_tokens = shapes["var"][0] if "var" in shapes else None
    positions = shapes["blocks.0.attn_mask"][0] if "blocks.0.attn_mask" in shapes else None
    head_dim = shapes["feat_rope.freqs_cos"][1] if "feat_rope.freqs_cos" in shapes else None
    head_dim = _agree("head_dim", head_dim, settings.get("head_dim", 64), source)
    channels = settings.get("channel_size", 4)
    patch = math.isqrt(patch_dim // channels) if patch_dim % channels == 0 else 0
    if patch * patch * channels != patch_dim:
        raise ValueError(
            f"the token width {patch_dim} is not channel_size={channels} times a square patch; give the yaml's "
            "channel_size"
        )
    patch = _agree("patch_size", patch, settings.get("patch_size"), source)
    grid = math.isqrt(grid_tokens) if grid_tokens is not None else None
    if grid is not None and grid * grid != grid_tokens:
        raise ValueError(f"'var' has {grid_tokens} rows, not a square grid")
    yaml_grid = settings["img_size"] // VAE_DOWNSAMPLING // patch if settings.get("img_size") else None
    grid = _agree("img_size / (8 * patch_size)", grid, yaml_grid, source)
    if grid is None:
        raise ValueError("the checkpoint has no 'var' buffer and no img_size was given: the training size is unknown")
    text_length = positions - grid * grid if positions is not None else None
    text_length = _agree("txt_size", text_length, settings.get("txt_size"), source) if text_hidden else 0
    return StarFlowConfig(
        sample_size=grid * patch,
        in_channels=channels,
        patch_size=patch,
        hidden_size=width,
        deep_hidden_size=deep_width,
        layers_per_block=layers,
        head_dim=head_dim,
        mlp_ratio=fc1 // width,
        soft_clip=float(settings.get("soft_clip", 0.0) or 0.0),
        noise_std=float(settings.get("noise_std", 0.0) or 0.0),
        text_hidden_size=text_hidden,
        max_text_length=text_length or 0,
        latent_norm_regularization=float(settings.get("latent_norm_regularization", 0.0) or 0.0),
    )


def describe_config(config: StarFlowConfig) -> str:
    parameters = meta_model(StarFlowModel, config).num_parameters()
    return (
        f"{config.in_channels}x{config.sample_size}x{config.sample_size} latents, patch {config.patch_size}, "
        f"{config.num_blocks} blocks {config.layers_per_block}, width {config.hidden_size}/{config.deep_hidden_size}, "
        f"head_dim {config.head_dim}, text {config.max_text_length}x{config.text_hidden_size}, "
        f"{parameters / 1e6:.1f}M parameters"
    )


# ---------------------------------------------------------------------------------------------- loading
def _check_values(state: Mapping[str, torch.Tensor], source: str) -> None:
    not_float = [f"{key!r} ({tensor.dtype})" for key, tensor in state.items() if not tensor.is_floating_point()]
    if not_float:
        raise ValueError(f"{source}: every weight must be a floating-point tensor; got {', '.join(not_float[:6])}")


def model_from_apple_state_dict(
    state: Mapping[str, torch.Tensor], config: StarFlowConfig, source: str = "the checkpoint"
) -> StarFlowModel:
    """A StarFlowModel that uses the tensors of `state` as its weights (no copy: built on the meta device, the
    tensors assigned). Apple's deprecated buffers are optional (older or stripped files may lack them)."""
    expected = expected_apple_shapes(config)
    optional = [key for key in expected if _DROPPED.match(key) and key not in state]
    for key in optional:
        expected.pop(key)
    check_state_dict(state, expected, source, f"the configuration {describe_config(config)}")
    _check_values(state, source)
    model = meta_model(StarFlowModel, config)
    model.load_state_dict(apple_to_hf_state_dict(state), strict=True, assign=True)
    return model.eval()


def _yaml_settings(config_yaml: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any] | None:
    if config_yaml is None or isinstance(config_yaml, Mapping):
        return None if config_yaml is None else dict(config_yaml)
    return read_apple_yaml(config_yaml)


def assumed_settings_note() -> str:
    """What a conversion without `--config` assumes (the settings the weights cannot tell)."""
    shown = ("noise_std", "soft_clip", "channel_size", "latent_norm_regularization", "head_dim", "img_size", "txt_size")
    values = ", ".join(f"{key} {RELEASED_YAML[key]}" for key in shown)
    return f"no --config given: assuming the released {RELEASED_YAML_NAME} values ({values})"


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
    source = f"checkpoint {os.fspath(path)}"
    settings = _yaml_settings(config_yaml)
    if settings is None and warn_assumed:
        from transformers.utils import logging

        logging.get_logger(__name__).warning(assumed_settings_note())
    state = load_apple_state_dict(path)
    if not is_starflow_checkpoint_keys(list(state)):
        raise ValueError(
            f"{source} is not an apple/ml-starflow checkpoint (no start tokens or final norms among its keys: an "
            "ml-tarflow checkpoint converts with `tarflow-hf convert`, which recognises both)"
        )
    yaml_source = "the released yaml" if settings is None else f"config {os.fspath(config_yaml)}"
    config = starflow_config_from_apple(state, settings, yaml_source)
    return model_from_apple_state_dict(state, config, source)


# -------------------------------------------------------------------------------------------- model card
def conversion_note(source: str) -> str:
    """What a converted folder is: Apple's tensors, renamed, in another file format."""
    return (
        f"A format conversion of Apple's STARFlow checkpoint `{Path(source).name}` (\"STARFlow: Scaling Latent "
        'Normalizing Flows for High-resolution Image Synthesis", Gu et al. 2025; code and weights: '
        "[apple/ml-starflow](https://github.com/apple/ml-starflow)) for tarflow-hf. The tensors are Apple's, "
        "unchanged; only their names and file format differ, and `tarflow-hf convert --reverse` writes the original "
        "`.pth` back. All credit for the model goes to its authors at Apple."
    )


def model_card(config: StarFlowConfig, source: str, has_license_file: bool = False) -> str:
    """README.md of a converted folder: what it is, where it comes from, and the weights' license (with a warning
    when the folder does not carry the license's text)."""
    return f"""---
library_name: transformers
license: other
license_name: apple-amlr
license_link: https://github.com/apple/ml-starflow/blob/main/LICENSE_MODEL
tags:
- starflow
- normalizing-flow
- text-to-image
---

# STARFlow (converted)

{conversion_note(source)}

**License.** {APPLE_AMLR.card_text(has_license_file)} All credit for the model goes to its authors at Apple.

Configuration: {describe_config(config)}; training noise std {config.noise_std}, soft clip {config.soft_clip}.

```python
from tarflow_hf.modeling_starflow import StarFlowModel

model = StarFlowModel.from_pretrained("path/to/this/folder")
```
"""


# ------------------------------------------------------------------------------------------ conversions
def convert_ml_starflow_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config_yaml: str | os.PathLike | None = None,
    license_file: str | os.PathLike | None = None,
    overwrite: bool = False,
    warn_assumed: bool = True,
) -> StarFlowConfig:
    """Convert an Apple `.pth` into a model folder (`config.json`, `model.safetensors`, a model card, and the
    license text when `license_file` is given), written atomically. Returns the configuration."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if license_file is not None and not Path(license_file).is_file():
        raise FileNotFoundError(f"license file not found: {license_file}")
    model = load_ml_starflow_checkpoint(checkpoint, config_yaml, warn_assumed=warn_assumed)
    with atomic_folder(output_dir, overwrite=overwrite, may_replace=is_tarflow_folder) as tmp:
        _write_model_folder(model, tmp, checkpoint, license_file)
    return model.config


def _write_model_folder(
    model: StarFlowModel, folder: Path, checkpoint: Path, license_file: str | os.PathLike | None
) -> None:
    """The converted model with its code and `auto_map` (so `AutoModel`, with `trust_remote_code` where tarflow-hf
    is not installed, loads it), its card, and the license text when given."""
    register_auto_classes()  # save_pretrained writes the code and `auto_map` of registered classes only
    model.save_pretrained(folder)
    card = model_card(model.config, str(checkpoint), has_license_file=license_file is not None)
    (folder / "README.md").write_text(card, encoding="utf-8")
    if license_file is not None:
        shutil.copyfile(license_file, folder / "LICENSE")


def _model_directory(folder: Path) -> Path:
    check_folder(folder, "a converted model folder")
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"  # a pipeline folder, or a --transformer-only conversion
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (config.json + model.safetensors)")
    return folder


def read_starflow_folder(folder: str | os.PathLike) -> tuple[StarFlowConfig, dict[str, torch.Tensor]]:
    """The config and the exact stored tensors of a converted (or saved) StarFlow model folder."""
    from safetensors.torch import load_file

    model_dir = _model_directory(Path(folder))
    config = read_model_config(model_dir, StarFlowConfig)
    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not (model_dir / file).is_file():
            raise FileNotFoundError(f"no {file} in {model_dir}")
        state.update(load_file(model_dir / file))
    check_state_dict(state, expected_hf_shapes(config), f"the weights in {model_dir}", "its config.json")
    return config, state


def export_ml_starflow_checkpoint(
    model_or_folder: StarFlowModel | str | os.PathLike, path: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write a StarFlowModel (or a converted folder) as an Apple `.pth`: Apple's keys and order, the weights as
    they are, and the deprecated buffers restored, so that `load_state_dict` in Apple's code takes it as is."""
    path = Path(path)
    if path.is_dir():
        raise FileExistsError(f"output {path} is a directory; give a .pth file path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output file {path} exists; pass --overwrite to replace it")
    if isinstance(model_or_folder, StarFlowModel):
        config, state = model_or_folder.config, {k: v.detach() for k, v in model_or_folder.state_dict().items()}
    else:
        config, state = read_starflow_folder(model_or_folder)
    apple = hf_to_apple_state_dict(state, config)
    with atomic_file(path) as tmp:
        torch.save(apple, tmp)
    return path


# ------------------------------------------------------------------------------------------ pipelines
def is_converted_folder(folder: Path) -> bool:
    """What `--overwrite` may replace: a TarFlow/STARFlow pipeline or model folder, or a `--transformer-only`
    output (a folder whose `transformer/` is a STARFlow or TarFlow model folder)."""
    return is_tarflow_folder(folder) or is_tarflow_folder(folder / "transformer")


def _load_component(kind: str, load: Any, name: str) -> Any:
    try:
        return load(name)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        flag = "--text-encoder" if kind != "VAE" else "--vae"
        raise ValueError(
            f"could not load the {kind} {name!r} ({first_line}); give a local folder with {flag}, or convert the "
            "transformer alone with --transformer-only"
        ) from None


def load_pipeline_components(text_encoder: str | None = None, vae: str | None = None) -> dict[str, Any]:
    """The components around a STARFlow transformer: T5's encoder (only the encoder's weights are loaded) and its
    tokenizer from `text_encoder`, and a diffusers AutoencoderKL from `vae` (defaults: Apple's choices)."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, T5EncoderModel

    text_encoder = text_encoder or STARFLOW_TEXT_ENCODER
    vae = vae or STARFLOW_VAE
    return {
        "text_encoder": _load_component("text encoder", T5EncoderModel.from_pretrained, text_encoder).eval(),
        "tokenizer": _load_component("tokenizer", AutoTokenizer.from_pretrained, text_encoder),
        "vae": _load_component("VAE", AutoencoderKL.from_pretrained, vae).eval(),
    }


def convert_ml_starflow_pipeline(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    config_yaml: str | os.PathLike | None = None,
    license_file: str | os.PathLike | None = None,
    text_encoder: str | None = None,
    vae: str | None = None,
    transformer_only: bool = False,
    overwrite: bool = False,
    warn_assumed: bool = True,
) -> StarFlowConfig:
    """Convert an Apple `.pth` into a `StarFlowPipeline` folder (`StarFlowPipeline.from_pretrained(output_dir)`):
    the converted transformer, T5's encoder and tokenizer from `text_encoder`, the VAE from `vae`, the model card
    and (with `license_file`) the license as `LICENSE`. With `transformer_only`, `output_dir/transformer/` alone
    (with its card and license). Written atomically; the components are loaded before anything is written."""
    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    if license_file is not None and not Path(license_file).is_file():
        raise FileNotFoundError(f"license file not found: {license_file}")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()):  # refused before the (long) loading, not after
        if not overwrite:
            raise FileExistsError(
                f"output directory {output_dir} exists and is not empty; pass --overwrite to replace it"
            )
        if not is_converted_folder(output_dir):
            raise FileExistsError(
                f"refusing to replace {output_dir}: it is not a TarFlow/STARFlow pipeline or model folder; remove it "
                "yourself or choose another output directory"
            )
    model = load_ml_starflow_checkpoint(checkpoint, config_yaml, warn_assumed=warn_assumed)
    check_finite(model.state_dict(), f"checkpoint {checkpoint}")
    components = None if transformer_only else load_pipeline_components(text_encoder, vae)
    with atomic_folder(output_dir, overwrite=overwrite, may_replace=is_converted_folder) as tmp:
        if components is None:
            _write_model_folder(model, tmp / "transformer", checkpoint, license_file)
        else:  # the pipeline's card (tarflow_hf.hub), told that this is a conversion, and checking for LICENSE
            from .pipeline_starflow import StarFlowPipeline

            if license_file is not None:
                shutil.copyfile(license_file, tmp / "LICENSE")
            pipeline = StarFlowPipeline(transformer=model, **components)
            description = conversion_note(str(checkpoint))
            pipeline.save_pretrained(tmp, model_card={"description": description, "repo_id": output_dir.name})
    return model.config


def is_starflow_source(path: str | os.PathLike) -> bool:
    """True when `path` is an apple/ml-starflow `.pth` (by its keys, read memory-mapped) or a STARFlow model folder
    (config.json, or transformer/config.json, with model_type "starflow"); False for anything else, unreadable
    files included (the ml-tarflow converter then reports what is wrong)."""
    path = Path(path)
    if path.is_dir():
        for config_file in (path / "config.json", path / "transformer" / "config.json"):
            try:
                if json.loads(config_file.read_text(encoding="utf-8")).get("model_type") == StarFlowConfig.model_type:
                    return True
            except (OSError, ValueError, AttributeError):
                continue
        return False
    try:
        state = load_apple_state_dict(path)
    except (OSError, ValueError):
        return False
    return is_starflow_checkpoint_keys(list(state))


def is_starflow_checkpoint_keys(keys: Sequence[str]) -> bool:
    """True for the keys of an apple/ml-starflow state dict (start tokens, RMSNorm, text projection), as opposed to
    an ml-tarflow one: lets `tarflow-hf convert` dispatch on the checkpoint."""
    return any(key.endswith(".sos_embed") or key.endswith(".final_norm.weight") for key in keys)


__all__ = [
    "apple_to_hf_state_dict",
    "convert_ml_starflow_checkpoint",
    "convert_ml_starflow_pipeline",
    "deprecated_buffers",
    "export_ml_starflow_checkpoint",
    "hf_to_apple_state_dict",
    "is_converted_folder",
    "is_starflow_checkpoint_keys",
    "is_starflow_source",
    "load_ml_starflow_checkpoint",
    "load_pipeline_components",
    "read_apple_yaml",
    "starflow_config_from_apple",
]
