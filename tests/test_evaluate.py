"""Evaluation: bits/dim, FID pieces (with the real Inception network on a few tiny images), class consistency,
the classifier, and the `tarflow-hf evaluate` command end to end."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_model, tiny_config

from tarflow_hf.classifier import SmallCNN, accuracy, load_classifier, save_classifier, train_classifier
from tarflow_hf.commands import main as cli_main
from tarflow_hf.evaluate import (
    InceptionFeatures,
    balanced_labels,
    bits_per_dim,
    class_consistency,
    dequantize,
    frechet_distance,
    generate,
    image_seed,
)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: list[str]):
        self.images, self.labels, self.class_names = images, labels, class_names

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], int(self.labels[index])


def quantized_images(count: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 1, size, size), generator=generator).float() / 127.5 - 1


def blob_dataset(count: int, size: int = 8, seed: int = 0) -> ListDataset:
    """Class c: a bright 3x3 blob at one of four places. Easy to classify, so a tiny CNN learns it fast."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 4
    images = torch.full((count, 1, size, size), -1.0) + 0.2 * torch.rand(count, 1, size, size, generator=generator)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, 0, 4 * row : 4 * row + 3, 4 * col : 4 * col + 3] = 1.0
    return ListDataset(images, labels, ["a", "b", "c", "d"])


# -------------------------------------------------------------------------------------------------------- bpd
def test_dequantization_stays_in_the_bin():
    images = quantized_images(16)
    noisy = dequantize(images, torch.Generator().manual_seed(0))
    levels = torch.round((images + 1) * 127.5)
    assert torch.equal(((noisy + 1) / 2 * 256).floor(), levels)


def test_bits_per_dim_is_the_mean_over_dequantized_images():
    model = random_model(tiny_config())
    images = quantized_images(10)
    labels = torch.arange(10) % 3
    dataset = ListDataset(images, labels, ["x", "y", "z"])
    got = bits_per_dim(model, dataset, "uniform", batch_size=4, seed=5)
    # Independently: image i dequantized by its own generator (seeded from the seed and i, so no split of the
    # images into batches or processes changes its noise) -> -log2 p(x) / D + log2(128).
    expected = []
    for i in range(10):
        x = dequantize(images[i : i + 1], torch.Generator().manual_seed(image_seed(5, i)))
        with torch.no_grad():
            out = model(x, labels[i : i + 1])
        expected.append(-out.log_likelihood / x[0].numel() / math.log(2) + 7.0)
    assert got == pytest.approx(torch.cat(expected).mean().item(), rel=1e-6)
    assert bits_per_dim(model, dataset, "uniform", batch_size=3, seed=5) == pytest.approx(got, rel=1e-6)
    assert bits_per_dim(model, dataset, "uniform", batch_size=4, seed=6) != pytest.approx(got, rel=1e-6)
    assert len({image_seed(seed, i) for seed in range(50) for i in range(50)}) == 2500
    unconditional = bits_per_dim(model, dataset, "uniform", batch_size=4, seed=5, use_labels=False)
    assert unconditional != pytest.approx(got, rel=1e-9)
    with pytest.raises(ValueError, match="uniform"):
        bits_per_dim(model, dataset, "laplace")


# ---------------------------------------------------------------------------------------------------- samples
def test_generate_is_deterministic_and_quantized():
    model = random_model(tiny_config(default_guidance_scale=2.0))
    labels = balanced_labels(3, 2)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    first = generate(model, labels, 6, seed=3, batch_size=4)
    again = generate(model, labels, 6, seed=3, batch_size=6)  # batching must not matter
    assert first.dtype == torch.uint8 and first.shape == (6, 1, 8, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, generate(model, labels, 6, seed=4))
    unguided = generate(model, labels, 6, seed=3, guidance_scale=1.0)
    assert not torch.equal(first, unguided)  # the config's default guidance was used


def test_class_consistency_counts_matches():
    class Oracle:
        def __init__(self, answers):
            self.answers = answers

        def predict(self, images):
            return self.answers

    labels = torch.tensor([0, 0, 1, 1])
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert class_consistency(Oracle(labels), images, labels)["accuracy"] == 1.0
    half = class_consistency(Oracle(torch.tensor([0, 1, 1, 0])), images, labels)
    assert half["accuracy"] == 0.5 and half["per_class"] == {0: 0.5, 1: 0.5}


# -------------------------------------------------------------------------------------------------------- FID
def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_nuclear_norm_form_for_few_samples():
    # With S1 = A'A and S2 = B'B (centred features over sqrt(n - 1)), Tr sqrt(S1 S2) is the nuclear norm of A B'.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(7, 12)), rng.normal(1.0, 2.0, size=(9, 12))
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    mean_term = ((x.mean(0) - y.mean(0)) ** 2).sum()
    expected = mean_term + (a**2).sum() + (b**2).sum() - 2 * trace_sqrt
    got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert got == pytest.approx(expected, rel=1e-7)


def test_real_inception_features_on_tiny_images():
    features = InceptionFeatures(batch_size=4)
    gray = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    out_gray = features(gray)
    out_rgb = features(gray.repeat(1, 3, 1, 1))
    assert out_gray.shape == (2, 2048) and torch.isfinite(out_gray).all()
    torch.testing.assert_close(out_gray, out_rgb)  # grayscale is repeated to three channels
    assert not torch.allclose(out_gray[0], out_gray[1])  # different images, different features


# ------------------------------------------------------------------------------------------------- classifier
def test_classifier_learns_and_round_trips(tmp_path):
    train_set, test_set = blob_dataset(64), blob_dataset(32, seed=1)
    model = train_classifier(train_set, epochs=3, batch_size=16, lr=5e-3, log_every=0)
    assert accuracy(model, test_set) == 1.0
    save_classifier(model, tmp_path / "clf", {"class_names": train_set.class_names})
    loaded = load_classifier(tmp_path / "clf")
    assert torch.equal(loaded.predict(test_set.images), model.predict(test_set.images))
    assert loaded.class_names == ["a", "b", "c", "d"]
    with pytest.raises(FileNotFoundError, match="not a classifier folder"):
        load_classifier(tmp_path)


# ------------------------------------------------------------------------------------------------------- CLI
def write_idx(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (folder / (stem + ".gz")).write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_evaluate_command_writes_all_metrics(tmp_path, capsys):
    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    model = random_model(tiny_config(num_classes=10, default_guidance_scale=1.5))
    TarFlowPipeline(transformer=model).save_pretrained(str(tmp_path / "model"))
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "idx", rng.integers(0, 256, (6, 8, 8)), np.arange(6) % 10)
    save_classifier(SmallCNN(1, 8, 10, width=4), tmp_path / "clf")
    output = tmp_path / "metrics.json"
    code = cli_main([
        "evaluate", str(tmp_path / "model"), "--dataset", "mnist", "--data-dir", str(tmp_path / "idx"),
        "--metrics", "bpd,fid,accuracy", "--bpd-noise", "uniform,gaussian", "--num-samples", "3",
        "--classifier", str(tmp_path / "clf"), "--samples-per-class", "1", "--output", str(output),
        "--fid-stats-cache", str(tmp_path / "ref.npz"), "--save-samples", str(tmp_path / "grid.png"),
    ])  # fmt: skip
    assert code == 0
    metrics = json.loads(output.read_text())
    assert metrics == json.loads(capsys.readouterr().out)
    assert metrics["guidance_scale"] == 1.5 and metrics["fid_samples"] == 3 and metrics["fid_reference_images"] == 6
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
    assert metrics["accuracy_samples"] == 10 and 0 <= metrics["class_accuracy"] <= 1
    assert metrics["bits_per_dim"] > 0 and metrics["bits_per_dim_gaussian_noise"] != metrics["bits_per_dim"]
    with np.load(tmp_path / "ref.npz") as cached:
        assert int(cached["count"]) == 6 and cached["mu"].shape == (2048,)
    assert (tmp_path / "grid.png").is_file()
    # The floor: real test images scored like samples, against the (cached) reference statistics.
    real_output = tmp_path / "real.json"
    code = cli_main([
        "evaluate", str(tmp_path / "model"), "--dataset", "mnist", "--data-dir", str(tmp_path / "idx"),
        "--metrics", "fid", "--num-samples", "3", "--fid-real-split", "test",
        "--fid-stats-cache", str(tmp_path / "ref.npz"), "--output", str(real_output),
    ])  # fmt: skip
    real = json.loads(real_output.read_text())
    assert code == 0 and real["fid_real_split"] == "test" and np.isfinite(real["fid"])
    assert real["fid"] != pytest.approx(metrics["fid"])


def test_evaluate_command_rejects_bad_requests(tmp_path, capsys):
    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    TarFlowPipeline(transformer=random_model(tiny_config())).save_pretrained(str(tmp_path / "model"))
    assert cli_main(["evaluate", str(tmp_path / "model"), "--metrics", "fid,iq"]) == 2
    assert "unknown metric(s) ['iq']" in capsys.readouterr().err
    assert cli_main(["evaluate", str(tmp_path / "model"), "--metrics", "accuracy"]) == 2
    assert "accuracy needs --classifier" in capsys.readouterr().err


def test_two_process_evaluation_matches_one_process(tmp_path):
    """`accelerate launch` with 2 CPU processes splits images, samples and Inception features with accelerate's
    own tools and gives one process's metrics: the same samples bit for bit, bits/dim and FID to float rounding
    (batches hold other images, so matrix products may round differently)."""
    from conftest import launch_two_processes

    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    TarFlowPipeline(transformer=random_model(tiny_config(num_classes=10))).save_pretrained(str(tmp_path / "model"))
    torch.manual_seed(0)
    save_classifier(SmallCNN(1, 8, 10, width=4), tmp_path / "clf")
    write_idx(tmp_path / "idx", np.random.default_rng(0).integers(0, 256, (7, 8, 8)), np.arange(7) % 10)
    common = [
        str(tmp_path / "model"), "--dataset", "mnist", "--data-dir", str(tmp_path / "idx"),
        "--metrics", "bpd,fid,accuracy", "--bpd-noise", "uniform,gaussian", "--num-samples", "5",
        "--classifier", str(tmp_path / "clf"), "--samples-per-class", "3", "--guidance-scale", "2",
        "--batch-size", "4", "--quiet",
    ]  # fmt: skip
    two = ["--output", str(tmp_path / "two.json"), "--save-samples", str(tmp_path / "two.png")]
    done = launch_two_processes(["-m", "tarflow_hf", "evaluate", *common, *two])
    assert done.returncode == 0, done.stderr[-3000:]
    one = ["--output", str(tmp_path / "one.json"), "--save-samples", str(tmp_path / "one.png")]
    assert cli_main(["evaluate", *common, *one]) == 0
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["class_accuracy"] == one["class_accuracy"] and two["accuracy_samples"] == 30
    assert (tmp_path / "two.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    for metric in ("bits_per_dim", "bits_per_dim_gaussian_noise", "fid"):
        assert two[metric] == pytest.approx(one[metric], rel=1e-5), metric
    assert two["fid_samples"] == one["fid_samples"] == 5 and two["fid_reference_images"] == 7


def test_classifier_command_writes_a_folder_with_its_test_accuracy(tmp_path, capsys):
    from tarflow_hf.classifier import main as classifier_main

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 8, 8)), np.arange(16) % 10
    write_idx(tmp_path / "idx", images, labels)  # the test split
    for stem, array in (("train-images-idx3-ubyte", images), ("train-labels-idx1-ubyte", labels)):
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        (tmp_path / "idx" / (stem + ".gz")).write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    argv = [
        "--data-dir",
        str(tmp_path / "idx"),
        "--output-dir",
        str(tmp_path / "clf"),
        "--epochs",
        "1",
        "--batch-size",
        "8",
    ]
    assert classifier_main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert config["test_accuracy"] == printed["test_accuracy"]
    assert config["class_names"] == [str(i) for i in range(10)]
    loaded = load_classifier(tmp_path / "clf")
    dataset = ListDataset(torch.from_numpy(images).float()[:, None] / 127.5 - 1, torch.from_numpy(labels), [])
    assert accuracy(loaded, dataset) == pytest.approx(config["test_accuracy"])
    assert classifier_main(["--data-dir", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "x")]) == 2


# ------------------------------------------------------------------------------------------- failed writes
def disk_full(file, content: bytes = b"part") -> None:
    """What a serializer does when the disk fills up: it writes part of the file (a path or an open file), then
    fails."""
    if hasattr(file, "write"):
        file.write(content)
    else:
        Path(file).write_bytes(content)
    raise OSError(28, "No space left on device")


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones included) -> its bytes (None for folders)."""
    return {str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes() for path in folder.rglob("*")}


def test_failed_writes_keep_the_previous_outputs(tmp_path, monkeypatch):
    """Each file evaluation writes (results JSON, sample grid, reference statistics cache, classifier folder), when
    its write fails midway, leaves the previous one as it was and no temporary behind."""
    from types import SimpleNamespace

    import PIL.Image
    import safetensors.torch
    from accelerate import PartialState

    from tarflow_hf import evaluate as evaluate_module
    from tarflow_hf.commands import evaluate as evaluate_command

    accelerator = PartialState()
    dataset = blob_dataset(8)

    def features(images: torch.Tensor) -> torch.Tensor:  # 64 features stand in for Inception's
        return images.flatten(1).float()

    samples = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    monkeypatch.setattr(evaluate_command, "evaluate", lambda args: {"fid": 1.0})

    def write_results():
        evaluate_command.run(SimpleNamespace(output=str(tmp_path / "metrics.json")))

    def write_statistics(count: int):
        evaluate_module.reference_statistics(dataset, count, features, tmp_path / "ref.npz", accelerator)

    save_classifier(SmallCNN(1, 8, 4, width=4), tmp_path / "clf")
    write_statistics(6)
    evaluate_module._save_grid(samples, 2, 2, tmp_path / "grid.png")
    write_results()
    before = snapshot(tmp_path)

    write_text = Path.write_text

    def results_fail(path, text, *args, **kwargs):
        if "metrics.json" not in path.name:
            return write_text(path, text, *args, **kwargs)
        disk_full(path, text[:3].encode())

    failing_writes = [  # (serializer, its failing stand-in, a write that uses it)
        (Path, "write_text", results_fail, write_results),
        (PIL.Image.Image, "save", lambda image, fp, *a, **k: disk_full(fp),
         lambda: evaluate_module._save_grid(samples[:2], 1, 2, tmp_path / "grid.png")),
        (np, "savez", lambda file, **arrays: disk_full(file), lambda: write_statistics(8)),  # another key: rewritten
        (safetensors.torch, "save_file", lambda tensors, name, **k: disk_full(name),
         lambda: save_classifier(SmallCNN(1, 8, 4, width=8), tmp_path / "clf")),
    ]  # fmt: skip
    for owner, name, failing, write in failing_writes:
        with monkeypatch.context() as patch:
            patch.setattr(owner, name, failing)
            with pytest.raises(OSError, match="No space left on device"):
                write()
        assert snapshot(tmp_path) == before, name


# ------------------------------------------------------------------------------ issue #13: inputs and outputs
def evaluate_error(capsys, *args) -> str:
    capsys.readouterr()
    assert cli_main(["evaluate", *map(str, args), "--quiet"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("tarflow-hf evaluate: error: ") and "\n" not in message
    return message


@pytest.fixture
def model_and_data(tmp_path):
    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    TarFlowPipeline(transformer=random_model(tiny_config(num_classes=10))).save_pretrained(str(tmp_path / "model"))
    write_idx(tmp_path / "idx", np.random.default_rng(0).integers(0, 256, (6, 8, 8)), np.arange(6) % 10)
    return tmp_path / "model", tmp_path / "idx"


@pytest.mark.parametrize("count", ["0", "-3"])
def test_bpd_max_images_below_one_is_refused(model_and_data, capsys, count):
    model, idx = model_and_data
    message = evaluate_error(capsys, model, "--dataset", "mnist", "--data-dir", idx, "--metrics", "bpd",
                             "--bpd-max-images", count)  # fmt: skip
    assert "--bpd-max-images must be >= 1" in message


def test_classifier_with_other_classes_is_refused(model_and_data, tmp_path, capsys):
    model, _ = model_and_data
    save_classifier(SmallCNN(1, 8, 4, width=4), tmp_path / "clf4")
    message = evaluate_error(capsys, model, "--classifier", tmp_path / "clf4", "--samples-per-class", "1")
    assert "4 classes" in message and "10" in message
    save_classifier(SmallCNN(1, 8, 10, width=4), tmp_path / "clf_names", {"class_names": [f"c{i}" for i in range(10)]})
    from tarflow_hf.pipeline_tarflow import TarFlowPipeline

    named = random_model(tiny_config(num_classes=10))
    named.config.id2label = {i: f"d{i}" for i in range(10)}
    TarFlowPipeline(transformer=named).save_pretrained(str(tmp_path / "named"))
    message = evaluate_error(capsys, tmp_path / "named", "--classifier", tmp_path / "clf_names")
    assert "'c0'" in message and "'d0'" in message


def test_output_onto_a_folder_is_refused_before_computing(model_and_data, tmp_path, capsys, monkeypatch):
    from tarflow_hf import evaluate as evaluate_module

    model, idx = model_and_data
    (tmp_path / "folder").mkdir()
    monkeypatch.setattr(evaluate_module, "bits_per_dim", lambda *a, **k: pytest.fail("computed before refusing"))
    message = evaluate_error(capsys, model, "--dataset", "mnist", "--data-dir", idx, "--metrics", "bpd",
                             "--output", tmp_path / "folder")  # fmt: skip
    assert "--output" in message and "folder" in message


def test_bundled_model_is_accepted(tmp_path, capsys):
    import tarflow_hf

    assert cli_main(["evaluate", "bundled", "--classifier", str(tarflow_hf.BUNDLED_CLASSIFIER), "--samples-per-class",
                     "1", "--guidance-scale", "1", "--quiet"]) == 0  # fmt: skip
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["accuracy_samples"] == 10 and 0 <= metrics["class_accuracy"] <= 1


def test_progress_bars_are_shown_and_the_inception_loader_warnings_filtered(model_and_data, capsys, monkeypatch):
    import warnings

    model, idx = model_and_data
    assert cli_main(["evaluate", str(model), "--dataset", "mnist", "--data-dir", str(idx), "--metrics", "bpd",
                     "--batch-size", "2"]) == 0  # fmt: skip
    assert "bits/dim" in capsys.readouterr().err  # a tqdm bar: 3 batches
    real_load = torch.jit.load

    def noisy_load(*args, **kwargs):
        warnings.warn("torch.jit.load is deprecated", FutureWarning, stacklevel=2)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "load", noisy_load)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        InceptionFeatures()
