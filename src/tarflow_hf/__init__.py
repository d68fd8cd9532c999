"""TarFlow for the Hugging Face ecosystem: a transformers model, a diffusers pipeline, and conversion tools."""

from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel

from .configuration_tarflow import TarFlowConfig
from .modeling_tarflow import JacobiStats, TarFlowModel, TarFlowOutput, TarFlowPreTrainedModel

if TYPE_CHECKING:
    from .pipeline_tarflow import TarFlowPipeline, TarFlowPipelineOutput

__version__ = "0.1.0"

# A class-conditional MNIST TarFlow shipped inside the package (a pipeline folder): sampling works offline.
BUNDLED_MODEL = str(Path(__file__).parent / "bundled" / "tarflow-mnist")
# The independent MNIST classifier used to score the bundled model's samples (tarflow_hf.classifier).
BUNDLED_CLASSIFIER = str(Path(__file__).parent / "bundled" / "mnist-classifier")

AutoConfig.register(TarFlowConfig.model_type, TarFlowConfig, exist_ok=True)
AutoModel.register(TarFlowConfig, TarFlowModel, exist_ok=True)
# Saved folders carry these two files and an `auto_map`, so `trust_remote_code=True` loads them anywhere.
TarFlowConfig.register_for_auto_class("AutoConfig")
TarFlowModel.register_for_auto_class("AutoModel")

_LAZY = {"TarFlowPipeline", "TarFlowPipelineOutput"}


def __getattr__(name: str):
    # The pipeline pulls in diffusers; import it only when asked for, so the model and converter load fast.
    if name in _LAZY:
        from . import pipeline_tarflow

        return getattr(pipeline_tarflow, name)
    raise AttributeError(f"module 'tarflow_hf' has no attribute {name!r}")


__all__ = [
    "BUNDLED_CLASSIFIER",
    "BUNDLED_MODEL",
    "JacobiStats",
    "TarFlowConfig",
    "TarFlowModel",
    "TarFlowOutput",
    "TarFlowPipeline",
    "TarFlowPipelineOutput",
    "TarFlowPreTrainedModel",
    "__version__",
]
