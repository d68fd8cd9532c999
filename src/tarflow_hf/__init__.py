"""TarFlow for the Hugging Face ecosystem: a transformers model, a diffusers pipeline, and conversion tools."""

from transformers import AutoConfig, AutoModel

from .configuration_tarflow import TarFlowConfig
from .modeling_tarflow import JacobiStats, TarFlowModel, TarFlowOutput, TarFlowPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(TarFlowConfig.model_type, TarFlowConfig, exist_ok=True)
AutoModel.register(TarFlowConfig, TarFlowModel, exist_ok=True)
# Saved folders carry these two files and an `auto_map`, so `trust_remote_code=True` loads them anywhere.
TarFlowConfig.register_for_auto_class("AutoConfig")
TarFlowModel.register_for_auto_class("AutoModel")

__all__ = ["JacobiStats", "TarFlowConfig", "TarFlowModel", "TarFlowOutput", "TarFlowPreTrainedModel", "__version__"]
