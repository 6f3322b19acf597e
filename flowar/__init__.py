"""FlowAR reference modules, the one sampler, and the pipeline that opens engines or checkpoints.

Importing ``flowar`` pulls in torch only: ONNX Runtime, TensorRT, CUDA bindings and diffusers
are imported late, by the code paths that need them. ``flowar.FlowARPipeline`` is imported on
first use.
"""

from flowar.config import PRESETS, FlowARConfig, get_preset
from flowar.errors import FlowARError

__version__ = "0.1.0"
__all__ = ["FlowARConfig", "FlowARPipeline", "FlowAROutput", "PRESETS", "get_preset", "FlowARError", "__version__"]


def __getattr__(name: str):
    if name in ("FlowARPipeline", "FlowAROutput"):
        from flowar.pipeline import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'flowar' has no attribute {name!r}")
