"""TarFlow and STARFlow for the Hugging Face ecosystem: transformers models, diffusers pipelines, conversion tools.

Importing the package is cheap (no torch, transformers or diffusers): the command line answers `--help` at once.
The classes load on first use, and so does their registration with transformers' auto classes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .configuration_starflow import StarFlowConfig
    from .configuration_tarflow import TarFlowConfig
    from .guidance import GuidanceRule
    from .modeling_starflow import StarFlowModel, StarFlowOutput, StarFlowPreTrainedModel
    from .modeling_tarflow import TarFlowModel, TarFlowOutput, TarFlowPreTrainedModel
    from .pipeline_starflow import StarFlowPipeline, StarFlowPipelineOutput
    from .pipeline_tarflow import TarFlowPipeline, TarFlowPipelineOutput
    from .registry import AutoFlowPipeline
    from .samplers import (
        BlockJacobiSampler,
        FlowSampler,
        JacobiSampler,
        NewtonSampler,
        SamplingStats,
        SequentialSampler,
    )

__version__ = "0.1.0"

# `BUNDLED_MODEL` (served by `__getattr__`): a class-conditional MNIST TarFlow shipped inside the package, weights,
# configs and card but no code, so sampling works offline. It loads only through the installed classes, so asking
# for its path registers them (`AutoModel.from_pretrained(f"{BUNDLED_MODEL}/transformer")` then works).
_BUNDLED_MODEL = str(Path(__file__).parent / "bundled" / "tarflow-mnist")
# The independent MNIST classifier used to score the bundled model's samples (tarflow_hf.classifier).
BUNDLED_CLASSIFIER = str(Path(__file__).parent / "bundled" / "mnist-classifier")

# Public name -> the module defining it, imported on first access.
_LAZY = {
    "TarFlowConfig": "configuration_tarflow",
    "TarFlowModel": "modeling_tarflow",
    "TarFlowOutput": "modeling_tarflow",
    "TarFlowPreTrainedModel": "modeling_tarflow",
    "TarFlowPipeline": "pipeline_tarflow",
    "TarFlowPipelineOutput": "pipeline_tarflow",
    "StarFlowConfig": "configuration_starflow",
    "StarFlowModel": "modeling_starflow",
    "StarFlowOutput": "modeling_starflow",
    "StarFlowPreTrainedModel": "modeling_starflow",
    "StarFlowPipeline": "pipeline_starflow",
    "StarFlowPipelineOutput": "pipeline_starflow",
    "AutoFlowPipeline": "registry",
    "GuidanceRule": "guidance",
    "FlowSampler": "samplers",
    "SequentialSampler": "samplers",
    "JacobiSampler": "samplers",
    "NewtonSampler": "samplers",
    "BlockJacobiSampler": "samplers",
    "SamplingStats": "samplers",
}
_registered = False


def register_auto_classes() -> None:
    """Make `AutoConfig`/`AutoModel` know the package's models (so a folder without code, such as the bundled
    one, loads with `AutoModel.from_pretrained`), and let `save_pretrained` of a bare model write its code and
    `auto_map`. Runs once; done on first access of any class above (and by `TarFlowPipeline`)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig, AutoModel

    from .configuration_starflow import StarFlowConfig
    from .configuration_tarflow import TarFlowConfig
    from .modeling_starflow import StarFlowModel
    from .modeling_tarflow import TarFlowModel

    for config_class, model_class in ((TarFlowConfig, TarFlowModel), (StarFlowConfig, StarFlowModel)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModel.register(config_class, model_class, exist_ok=True)
        config_class.register_for_auto_class("AutoConfig")
        model_class.register_for_auto_class("AutoModel")


def __getattr__(name: str) -> Any:
    if name == "BUNDLED_MODEL":
        register_auto_classes()
        return _BUNDLED_MODEL
    if name in _LAZY:
        register_auto_classes()
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'tarflow_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "BUNDLED_MODEL"})


__all__ = [
    "BUNDLED_CLASSIFIER",
    "BUNDLED_MODEL",
    "AutoFlowPipeline",
    "BlockJacobiSampler",
    "FlowSampler",
    "GuidanceRule",
    "JacobiSampler",
    "NewtonSampler",
    "SamplingStats",
    "SequentialSampler",
    "StarFlowConfig",
    "StarFlowModel",
    "StarFlowOutput",
    "StarFlowPipeline",
    "StarFlowPipelineOutput",
    "StarFlowPreTrainedModel",
    "TarFlowConfig",
    "TarFlowModel",
    "TarFlowOutput",
    "TarFlowPipeline",
    "TarFlowPipelineOutput",
    "TarFlowPreTrainedModel",
    "__version__",
    "register_auto_classes",
]
