"""A small CNN image classifier, independent of TarFlow, to check that class-conditional samples look like the
class they were asked for ("class-consistency accuracy").

Train it on the MNIST train split (a few CPU minutes) and save it as a folder holding `config.json` and
`model.safetensors`:

```bash
python -m tarflow_hf.classifier --dataset mnist --output-dir runs/mnist-classifier --epochs 3
```

```python
>>> from tarflow_hf.classifier import load_classifier
>>> classifier = load_classifier("runs/mnist-classifier")
>>> predictions = classifier.predict(images)  # images (B, 1, 28, 28) in [-1, 1]
```
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .fileio import atomic_folder

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool stages and a linear head: ~99% on MNIST after a couple of epochs.

    The input is resized to `image_size` if it differs (so a 32x32 padded model can be checked with a 28x28
    classifier) and expected in [-1, 1].
    """

    def __init__(self, num_channels: int = 1, image_size: int = 28, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.config = {
            "num_channels": num_channels,
            "image_size": image_size,
            "num_classes": num_classes,
            "width": width,
        }
        self.features = nn.Sequential(
            nn.Conv2d(num_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * side * side, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted class per image (eval mode, in chunks)."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = [self(images[i : i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(images), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def save_classifier(model: SmallCNN, folder: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `config.json` + `model.safetensors` into `folder` (atomically: staged next to it, then renamed)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder, overwrite=True) as staging:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / WEIGHTS_NAME))
        (staging / CONFIG_NAME).write_text(json.dumps({**model.config, **(metadata or {})}, indent=2))
    return folder


def load_classifier(folder: str | os.PathLike) -> SmallCNN:
    """Load a classifier folder written by `save_classifier`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not a classifier folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = SmallCNN(**{k: config[k] for k in ("num_channels", "image_size", "num_classes", "width")})
    model.load_state_dict(load_file(str(folder / WEIGHTS_NAME)))
    model.class_names = config.get("class_names")
    return model.eval()


def accuracy(model: SmallCNN, dataset: Dataset, batch_size: int = 500) -> float:
    """Top-1 accuracy on a dataset of (image, label)."""
    correct = total = 0
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        correct += (model.predict(images) == labels).sum().item()
        total += len(labels)
    return correct / max(total, 1)


def train_classifier(
    dataset: Dataset,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    width: int = 32,
    log_every: int = 100,
) -> SmallCNN:
    """Train a `SmallCNN` on `dataset` (with `class_names`) with AdamW and a cosine schedule; light random
    shifts (+-2 pixels) make it robust to the small misplacements of generated digits."""
    torch.manual_seed(seed)
    image, _ = dataset[0]
    model = SmallCNN(image.shape[0], image.shape[-1], len(dataset.class_names), width)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(loader))
    model.train()
    step = 0
    for epoch in range(epochs):
        for images, labels in loader:
            images = _random_shift(images, 2)
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"epoch {epoch} step {step}: loss {loss.item():.4f}", flush=True)
    return model.eval()


def _random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift the whole batch by a random offset, filling with the background value -1."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,)).tolist()
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    h, w = images.shape[-2:]
    return padded[..., max_shift + dy : max_shift + dy + h, max_shift + dx : max_shift + dx + w]


def main(argv: list[str] | None = None) -> int:
    from .data import load_image_dataset

    parser = argparse.ArgumentParser(prog="python -m tarflow_hf.classifier", description="train the MNIST CNN")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    try:
        train_set = load_image_dataset(args.dataset, "train", data_dir=args.data_dir)
        test_set = load_image_dataset(args.dataset, "test", data_dir=args.data_dir)
    except (ValueError, FileNotFoundError) as error:
        print(f"tarflow_hf.classifier: error: {error}", file=sys.stderr)
        return 2
    start = time.time()
    model = train_classifier(train_set, args.epochs, args.batch_size, args.lr, args.seed)
    minutes = (time.time() - start) / 60
    test_accuracy = accuracy(model, test_set)
    metadata = {
        "class_names": train_set.class_names,
        "dataset": args.dataset,
        "test_accuracy": test_accuracy,
        "train_minutes": round(minutes, 2),
        "command": " ".join(["python -m tarflow_hf.classifier", *(argv if argv is not None else sys.argv[1:])]),
    }
    save_classifier(model, args.output_dir, metadata)
    print(json.dumps({"test_accuracy": test_accuracy, "train_minutes": round(minutes, 2)}))
    return 0


__all__ = ["SmallCNN", "accuracy", "load_classifier", "save_classifier", "train_classifier"]

if __name__ == "__main__":
    sys.exit(main())
