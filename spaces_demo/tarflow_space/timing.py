"""How long requests take on this server: a calibration at startup (one image with every sampler the budget
allows, which also picks the default sampler) and every request served since, so that the page can say before a
click what to expect.
"""

from __future__ import annotations

import logging
import statistics
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image

from tarflow_hf.samplers import FlowSampler, get_sampler

from .sampling import Generation

logger = logging.getLogger("tarflow_space")

# A sampler is "exact enough" to be the default when its image differs from the sequential sampler's by at most
# this many 8-bit grey levels.
EXACT_ENOUGH_LEVELS = 2.0
KEPT_OBSERVATIONS = 16


class TimeEstimator:
    """Expected seconds of a request, from what this server measured. Sampling time is fitted as a + b x images
    per sampler once requests of two sizes were seen (until then: the per-image time times the images). Safe to
    use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: dict[str, list[tuple[int, float]]] = {}
        self._rankings: list[tuple[int, float]] = []

    def observe_sampling(self, sampler: str, num_images: int, seconds: float) -> None:
        with self._lock:
            kept = self._samples.setdefault(sampler, [])
            kept.append((num_images, seconds))
            del kept[:-KEPT_OBSERVATIONS]

    def observe_ranking(self, captions: int, seconds: float) -> None:
        with self._lock:
            self._rankings.append((captions, seconds))
            del self._rankings[:-KEPT_OBSERVATIONS]

    def sampling_seconds(self, sampler: str, num_images: int) -> float | None:
        with self._lock:
            points = list(self._samples.get(sampler, []))
        return _fit(points, num_images)

    def ranking_seconds(self, captions: int) -> float | None:
        with self._lock:
            points = list(self._rankings)
        return _fit(points, captions)


def _fit(points: list[tuple[int, float]], count: int) -> float | None:
    if not points:
        return None
    sizes = {n for n, _ in points}
    if len(sizes) == 1:
        size = next(iter(sizes))
        return statistics.median(s for _, s in points) / size * count
    xs, ys = np.array([n for n, _ in points], float), np.array([s for _, s in points], float)
    slope = max(float(np.polyfit(xs, ys, 1)[0]), 0.0)
    intercept = max(float(np.mean(ys - slope * xs)), 0.0)
    return intercept + slope * count


def describe_estimate(seconds: float | None, what: str) -> str:
    if seconds is None:
        return f"Expected time for {what}: not measured yet on this server."
    shown = f"{seconds:.3f}" if seconds < 1 else f"{seconds:.1f}"
    return f"Expected time for {what}: **about {shown} s** on this server (measured, not promised)."


@dataclass
class Calibration:
    seconds: dict[str, float]  # one image, per sampler
    deviation: dict[str, float]  # largest difference from the sequential sampler's image, in 8-bit levels
    default_sampler: str
    sample: PIL.Image.Image | None  # the sequential sampler's image

    def summary(self) -> str:
        if not self.seconds:
            return f"Default sampler: {self.default_sampler} (not measured at startup on this server)."
        parts = [
            f"{name} {self.seconds[name]:.2f} s"
            + (f" (off by {self.deviation[name]:.1f} levels)" if name != "sequential" else "")
            for name in self.seconds
        ]
        return (
            f"Measured at startup, one image: {'; '.join(parts)}. Default: {self.default_sampler}, the fastest "
            f"within {EXACT_ENOUGH_LEVELS:g} grey levels of the exact sequential sampler."
        )


def calibrate(
    generate_one: Callable[[FlowSampler], Generation],
    offered: list[str],
    estimator: TimeEstimator,
    forced: str | None = None,
) -> Calibration:
    """Time one image with every `offered` sampler (after a warm-up); the default sampler is `forced`, else the
    fastest whose image is within EXACT_ENOUGH_LEVELS of the sequential sampler's."""
    generate_one(get_sampler("sequential"))  # warm-up: first-call allocations and lazy imports
    seconds, deviation, reference, sample = {}, {}, None, None
    for name in ["sequential", *(name for name in offered if name != "sequential")]:
        result = generate_one(get_sampler(name))
        pixels = np.asarray(result.images[0], dtype=np.float64)
        if reference is None:
            reference, sample = pixels, result.images[0]
        seconds[name] = result.seconds
        deviation[name] = float(np.abs(pixels - reference).max())
        estimator.observe_sampling(name, 1, result.seconds)
    exact = [name for name in seconds if deviation[name] <= EXACT_ENOUGH_LEVELS]
    default = forced or min(exact, key=seconds.__getitem__)
    calibration = Calibration(seconds, deviation, default, sample)
    logger.info("%s", calibration.summary())
    return calibration
