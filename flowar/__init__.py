"""FlowAR reference modules, the one sampler, and checkpoint I/O.

Importing ``flowar`` pulls in torch only: ONNX Runtime, TensorRT, CUDA bindings and diffusers
are imported late, by the code paths that need them.
"""

from flowar.config import PRESETS, FlowARConfig, get_preset
from flowar.errors import FlowARError

__version__ = "0.1.0"
__all__ = ["FlowARConfig", "PRESETS", "get_preset", "FlowARError", "__version__"]
