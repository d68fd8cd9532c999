"""Training and fine-tuning of TarFlow and STARFlow models with 🤗 Accelerate: `train(args)` runs what the flags of
`tarflow-hf train` describe (`tarflow_hf.commands.arguments.train` declares them).

Apple's recipe (`apple/ml-tarflow/train.py`): AdamW (betas 0.9/0.95, weight decay 1e-4), linear warm-up then a
cosine decay to 1e-6, Gaussian noise augmentation of the [-1, 1] images (or uniform dequantization), label
dropout for classifier-free guidance (a dropped label is -1, the mean class embedding), the model's own `loss`,
and for volume-preserving models (`--no-nvp`) a prior variance that tracks the latents' E[z^2] (Apple's
`update_prior`). On top of it: mixed precision, gradient accumulation and clipping, EMA weights, checkpoints that
resume exactly, periodic sample grids, JSON-lines metrics and trackers, and a pipeline folder with a model card at
the end.

```bash
tarflow-hf train --dataset mnist --output-dir runs/mnist --hidden-size 128 --patch-size 4 --max-steps 2000
accelerate launch --num_processes 2 -m tarflow_hf train --dataset mnist --output-dir runs/mnist  # global batch
tarflow-hf train --init-from bundled --dataset digits/ --output-dir runs/digits      # fine-tune (or a folder, Hub id)
tarflow-hf train --init-from starflow-3b --dataset captioned/ --output-dir runs/sf --batch-size 32 --max-steps 1000
accelerate launch --config_file fsdp.yaml -m tarflow_hf train --init-from starflow-3b ...  # FSDP2, see README
```

Fine-tuning keeps the model's configuration (noise level, default guidance, label names, its pipeline's sampler;
`--replace-labels` takes the new dataset's class names when the class counts agree) and uses fine-tuning defaults
(a learning rate of 1e-4, a warm-up of 10% of the steps). A STARFlow pipeline (the family is read by
`tarflow_hf.registry`) trains on captioned images in its VAE's latent space; only its transformer trains.

What is written, and in which order: a checkpoint before a sample grid of the same step; the pipeline folder before
the final grid. A sample grid that fails is a warning; a non-finite loss, or an output that can no longer be
written, stops the run with one line naming the last good checkpoint. Resuming from an earlier checkpoint moves
what later steps wrote aside (`branches`); nothing the run wrote is deleted but rotated checkpoints.

Importing this package is cheap (no torch): `train` and `TrainResult` load on first use, and `defaults` (the
learning rates and noise level the command line shows) is standard library only.

| module | its one job |
|---|---|
| `defaults` | the defaults the command line shows and training applies (no torch) |
| `layout` | the run folder's names (no torch) |
| `state` | what a run holds (`Run`, `Progress`, `TrainResult`) and the family adapter's interface |
| `setup` | arguments checked and resolved, accelerator, data loader, optimizer, schedule lengths |
| `models` | the model to train: new from the flags, or `--init-from`'s checked against the data |
| `families` | the TarFlow and STARFlow adapters: data and losses' inputs, sample grids, the output pipeline |
| `recipe` | Apple's recipe parts: learning-rate schedule, input noise, label and caption dropout, prior update |
| `ema` | EMA weights, and whole tensors of FSDP2 shards |
| `loop` | steps and epochs: forward, backward, optimizer step, what is due after it |
| `metrics` | metrics.jsonl, trackers and their images |
| `checkpoints` | save, load, rotate, resume |
| `branches` | what an earlier branch of the run wrote later than the resumed step, moved aside |
| `outputs` | recipe.json, sample grids, the pipeline folder with its card, the upload |
| `runner` | `train`: the steps above in order, and the end of the run |
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import train
    from .state import TrainResult

# Public name -> the module defining it, imported on first access.
_LAZY = {"train": "runner", "TrainResult": "state"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TrainResult", "train"]
