"""The defaults of `tarflow-hf train` that depend on what is trained: the command line shows them in `--help` and
training applies them. Standard library only: `tarflow_hf.commands.arguments` imports it without torch."""

from __future__ import annotations

# Peak learning rates: a new model (Apple's order of magnitude for small models), and fine-tuning, where 2e-3 makes
# a pretrained model far worse before it gets better.
TRAIN_LR = 2e-3
FINE_TUNE_LR = 1e-4
# Gaussian noise on the [-1, 1] images of a new model (fine-tuning keeps the model's own).
TRAIN_NOISE_STD = 0.05
# A new model's size where neither a flag nor --config gives it (the rest: TarFlowConfig's defaults).
NEW_MODEL_DEFAULTS = {"patch_size": 4, "hidden_size": 128, "num_blocks": 4, "layers_per_block": 2, "head_dim": 64}
# The flags that size a new model (refused with --init-from, which keeps the pretrained architecture).
MODEL_SIZE_FLAGS = ("patch_size", "hidden_size", "num_blocks", "layers_per_block", "head_dim", "mlp_ratio")
# Fine-tuning warms up over this percentage of the steps (a new model: one epoch, at most this percentage).
WARMUP_PERCENT = 10
# The layers a LoRA adapts (`--lora-target-modules`): every attention's qkv and output projections and both MLP layers,
# in every flow block (the input, output and text projections are left alone).
LORA_TARGET_MODULES = ("qkv", "proj", "fc1", "fc2")

__all__ = [
    "FINE_TUNE_LR",
    "LORA_TARGET_MODULES",
    "MODEL_SIZE_FLAGS",
    "NEW_MODEL_DEFAULTS",
    "TRAIN_LR",
    "TRAIN_NOISE_STD",
    "WARMUP_PERCENT",
]
