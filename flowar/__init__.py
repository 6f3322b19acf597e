"""FlowAR reference modules, the one sampler, and the pipeline that opens engines or checkpoints.

Importing ``flowar`` pulls in torch only: ONNX Runtime, TensorRT, CUDA bindings and diffusers
are imported late, by the code paths that need them. ``flowar.FlowARPipeline`` is imported on
first use.
"""

import os

# ONNX Runtime (1.29 on) sends usage telemetry from Linux too, and writes a device id under
# ~/.cache/Microsoft, when it is imported: nothing of ours reaches the network at run time, so it is
# switched off before any of our modules imports it (a user's own setting stands).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from flowar.config import PRESETS, FlowARConfig, get_preset  # noqa: E402
from flowar.errors import FlowARError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FlowARConfig", "FlowARPipeline", "FlowAROutput", "PRESETS", "get_preset", "FlowARError", "__version__"]


def __getattr__(name: str):
    if name in ("FlowARPipeline", "FlowAROutput"):
        from flowar.pipeline import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'flowar' has no attribute {name!r}")
