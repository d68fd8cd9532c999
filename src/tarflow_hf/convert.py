"""Port apple/ml-tarflow checkpoints to TarFlowModel and back.

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

import re

import torch

from .configuration_tarflow import TarFlowConfig
from .modeling_tarflow import TarFlowModel

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


def apple_key_to_hf(key: str) -> str:
    for pattern, replacement in _RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def hf_key_to_apple(key: str) -> str:
    for pattern, replacement in _REVERSE_RENAMES:
        key = re.sub(pattern, replacement, key)
    return key


def apple_to_hf_state_dict(apple: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename Apple's keys to ours; drop the causal masks; squeeze the class embeddings' middle axis."""
    converted = {}
    for key, tensor in apple.items():
        if key.endswith(".attn_mask"):
            continue
        new_key = apple_key_to_hf(key)
        converted[new_key] = tensor.squeeze(1) if new_key.endswith(".class_embedding") else tensor
    return converted


def hf_to_apple_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `apple_to_hf_state_dict`, including the causal masks Apple stores."""
    apple = {}
    for key, tensor in state.items():
        apple_key = hf_key_to_apple(key)
        apple[apple_key] = tensor.unsqueeze(1) if apple_key.endswith(".class_embed") else tensor
        if key.endswith(".proj_in.weight"):
            num_patches = state[key.replace(".proj_in.weight", ".position_embedding")].shape[0]
            apple[apple_key.replace(".proj_in.weight", ".attn_mask")] = torch.tril(torch.ones(num_patches, num_patches))
    return apple


def load_ml_tarflow_checkpoint(path: str, config: TarFlowConfig) -> TarFlowModel:
    """Build a TarFlowModel of `config` with the weights of an Apple `.pth` file."""
    apple = torch.load(path, map_location="cpu", weights_only=True)
    model = TarFlowModel(config)
    model.load_state_dict(apple_to_hf_state_dict(apple), strict=True)
    return model.eval()
