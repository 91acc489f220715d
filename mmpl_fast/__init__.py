"""mmpl_fast: Macro-from-Micro Planning for long video generation with Wan2.1-family causal DiTs."""

from ._version import __version__
from .config import PRESETS, ModelConfig
from .pipeline import Pipeline, PipelineOutput

__all__ = ["PRESETS", "ModelConfig", "Pipeline", "PipelineOutput", "__version__"]
