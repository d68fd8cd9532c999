"""Data loading: IDX files, image folders, the optional `datasets` path, and the epoch-seeded sampler."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from tarflow_hf.data import (
    EpochShuffleSampler,
    ImageFolderDataset,
    load_captioned_dataset,
    load_image_dataset,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write an unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(folder: Path, count: int = 12, size: int = 8, seed: int = 0, compress: bool = True) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    for image_name, label_name in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    ):
        write_idx(folder / image_name, images, compress)
        write_idx(folder / label_name, labels, compress)
    return images, labels


def write_image_folder(root: Path, classes: dict[str, int], size: int = 8, mode: str = "L") -> None:
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / name / f"{i}.png")


@pytest.mark.parametrize("compress", [False, True])
def test_idx_dataset_values_and_labels(tmp_path, compress):
    images, labels = write_mnist_like(tmp_path, compress=compress)
    dataset = load_image_dataset("mnist", "train", data_dir=tmp_path)
    assert len(dataset) == len(images)
    assert dataset.class_names == [str(i) for i in range(10)]
    image, label = dataset[3]
    assert image.shape == (1, 8, 8) and label == labels[3]
    # [-1, 1] scaling of 8-bit values, exactly x / 127.5 - 1.
    torch.testing.assert_close(image[0], torch.from_numpy(images[3].astype(np.float32)) / 127.5 - 1)


def test_idx_padding_uses_background(tmp_path):
    write_mnist_like(tmp_path)
    padded = load_image_dataset("mnist", "test", image_size=12, data_dir=tmp_path)
    plain = load_image_dataset("mnist", "test", data_dir=tmp_path)
    image, _ = padded[0]
    assert image.shape == (1, 12, 12)
    torch.testing.assert_close(image[:, 2:10, 2:10], plain[0][0])
    assert (image[:, :2] == -1).all() and (image[:, :, -2:] == -1).all()


def test_fashion_mnist_names(tmp_path):
    write_mnist_like(tmp_path)
    dataset = load_image_dataset("fashion-mnist", data_dir=tmp_path)
    assert dataset.class_names[0] == "T-shirt/top" and len(dataset.class_names) == 10


def test_bad_idx_files_are_named(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        read_idx(bad)
    (tmp_path / "other").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks the IDX file"):
        load_image_dataset("mnist", data_dir=tmp_path / "other")
    truncated = write_idx(tmp_path / "t.idx", np.zeros((4, 3, 3), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-5])
    with pytest.raises(ValueError, match="announces"):
        read_idx(truncated)


def test_image_folder_classes_and_channels(tmp_path):
    write_image_folder(tmp_path / "gray", {"cat": 2, "dog": 3})
    dataset = load_image_dataset(str(tmp_path / "gray"))
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.class_names == ["cat", "dog"] and len(dataset) == 5
    assert sorted(label for _, label in dataset.samples) == [0, 0, 1, 1, 1]
    image, _ = dataset[4]
    assert image.shape == (1, 8, 8) and image.min() >= -1 and image.max() <= 1
    write_image_folder(tmp_path / "rgb", {"a": 1}, size=10, mode="RGB")
    rgb = load_image_dataset(str(tmp_path / "rgb"), image_size=8)
    assert rgb[0][0].shape == (3, 8, 8)


def test_unreadable_image_names_the_file(tmp_path):
    write_image_folder(tmp_path, {"a": 1, "b": 1})
    broken = tmp_path / "b" / "zz_broken.png"
    broken.write_bytes(b"not a png")
    dataset = load_image_dataset(str(tmp_path))
    index = next(i for i, (path, _) in enumerate(dataset.samples) if path == broken)
    with pytest.raises(ValueError, match=r"zz_broken\.png"):
        dataset[index]


def test_bad_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        load_image_dataset(str(tmp_path / "empty"))
    write_image_folder(tmp_path / "partial", {"a": 2})
    (tmp_path / "partial" / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*b has no images"):
        load_image_dataset(str(tmp_path / "partial"))


def test_hub_dataset_without_datasets_package_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ValueError, match="optional `datasets` package"):
        load_image_dataset("someone/some-dataset")


def test_epoch_sampler_is_seeded_per_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    sampler.set_epoch(0)
    first = list(sampler)
    torch.manual_seed(123)  # the global generator must not matter
    again = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first == again and first != second
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))


def save_dataset(folder: Path, columns: dict, features: dict) -> Path:
    """A folder as `datasets.DatasetDict.save_to_disk` writes it, with one split, "train"."""
    train = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    datasets.DatasetDict(train=train).save_to_disk(str(folder))
    return folder


def test_saved_hf_dataset_folder_is_read_through_datasets(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), "L") for _ in range(4)]
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["even", "odd"])}
    folder = save_dataset(tmp_path / "saved", {"image": images, "label": [0, 1, 0, 1]}, features)
    dataset = load_image_dataset(str(folder), "train", image_size=8)
    assert dataset.class_names == ["even", "odd"] and len(dataset) == 4
    image, label = dataset[1]
    assert image.shape == (1, 8, 8) and label == 1
    with pytest.raises(ValueError, match="has splits"):
        load_image_dataset(str(folder), "validation")


def test_saved_captioned_dataset_is_read_through_datasets(tmp_path):
    """Text-to-image data from `datasets`: (image, caption) items, RGB at the asked size, the caption column named
    by `caption_column`, and a clear error when it is missing."""
    images = [Image.new("RGB", (6, 6), (255 * (i % 2), 0, 0)) for i in range(3)]
    columns = {"image": images, "text": [f"caption {i}" for i in range(3)]}
    folder = save_dataset(tmp_path / "saved", columns, {"image": datasets.Image(), "text": datasets.Value("string")})
    dataset = load_captioned_dataset(str(folder), image_size=8)
    assert len(dataset) == 3 and "3 captioned images" in dataset.summary()
    image, caption = dataset[1]
    assert image.shape == (3, 8, 8) and caption == "caption 1"
    assert image[0].min() == 1.0 and image[1].max() == -1.0  # the red image, in model space [-1, 1]
    assert dataset[0][0][0].max() == -1.0  # the black one: rows are not mixed up
    with pytest.raises(ValueError, match=r"no caption column 'prompt' \(columns: \['image', 'text'\]\)"):
        load_captioned_dataset(str(folder), caption_column="prompt")


def test_image_folder_check_names_a_corrupt_file_before_any_is_decoded(tmp_path):
    write_image_folder(tmp_path, {"a": 3, "b": 3})
    broken = tmp_path / "b" / "1.png"
    broken.write_bytes(broken.read_bytes()[:-20])  # the header is intact: only the full read notices
    dataset = load_image_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"cannot read image .*b/1\.png"):
        dataset.check()
    (tmp_path / "b" / "2.png").write_bytes(b"not an image")
    broken.unlink()
    with pytest.raises(ValueError, match=r"cannot read image .*b/2\.png"):
        load_image_dataset(str(tmp_path)).check()


def test_image_folder_check_refuses_mixed_sizes_unless_resized(tmp_path):
    write_image_folder(tmp_path, {"a": 2})
    write_image_folder(tmp_path, {"b": 1}, size=12)
    with pytest.raises(ValueError, match=r"different sizes \(8x8: 2, 12x12: 1; e\.g\. .*b/0\.png\).*--image-size"):
        load_image_dataset(str(tmp_path)).check()
    resized = load_image_dataset(str(tmp_path), image_size=8)
    resized.check()  # one size after resizing
    assert {resized[i][0].shape for i in range(3)} == {(1, 8, 8)}


def test_relabeled_dataset_maps_labels_and_keeps_the_unlabelled():
    from tarflow_hf.data import RelabeledDataset

    class Pairs(torch.utils.data.Dataset):
        class_names = ("x", "y")

        def __len__(self):
            return 3

        def __getitem__(self, index):
            return torch.full((1, 2, 2), float(index)), [0, 1, -1][index]

    relabeled = RelabeledDataset(Pairs(), [1, 0], ["y", "x"])
    assert [relabeled[i][1] for i in range(3)] == [1, 0, -1]
    assert relabeled.class_names == ["y", "x"] and len(relabeled) == 3
    assert torch.equal(relabeled[2][0], torch.full((1, 2, 2), 2.0))
