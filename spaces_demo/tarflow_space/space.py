"""What the pages of one demo share: the models (catalog and store), the served family, the sampler defaults
measured at startup, the time estimates, the model-call counter and how model work reaches the GPU."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from tarflow_hf.registry import ModelFamily

from .events import ActiveCalls
from .models import ModelCatalog, ModelRef, ModelStore, require_family
from .timing import Calibration, TimeEstimator


@dataclass
class Page:
    """What the assembly needs from a tab: its components that depend on the model, their new values for a
    pipeline (when a visitor loads another model), what to chain after such a load (`follow(event)`: a fresh
    estimate), and API-only endpoints (`gr.api` functions by name, registered outside the tabs)."""

    outputs: list[Any]
    updates: Callable[[Any], tuple[Any, ...]]
    follow: list[Callable[[Any], Any]] = field(default_factory=list)
    endpoints: dict[str, Callable[..., Any]] = field(default_factory=dict)


@dataclass
class Space:
    catalog: ModelCatalog
    store: ModelStore
    family: ModelFamily
    on_gpu: Callable[[Callable[..., Any]], Callable[..., Any]]  # `spaces.GPU(...)` on the Hub, else as it is
    calibration: Calibration
    offered_samplers: tuple[str, ...]  # those with at least one image within the budget
    active_calls: ActiveCalls = field(default_factory=ActiveCalls)
    model_state: gr.State | None = None  # the model a browser session uses (a `ModelRef`)
    estimators: dict[str, TimeEstimator] = field(default_factory=dict)  # by model location
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def startup(self) -> ModelRef:
        return self.catalog.startup

    def served(self) -> Any:
        """The served pipeline (loaded at startup)."""
        return self.store.load(self.startup)

    def pipeline(self, ref: ModelRef) -> Any:
        """The pipeline of a session's model, of the served family (a visitor's other-family model is refused)."""
        return self.store.load(ref, self.family)

    def check_family(self, ref: ModelRef) -> None:
        """`ValueError` for a model of another family than the served one, without loading it."""
        require_family(ref, self.store.family(ref), self.family)

    def estimator_for(self, ref: ModelRef) -> TimeEstimator:
        with self._lock:
            return self.estimators.setdefault(ref.location, TimeEstimator())
