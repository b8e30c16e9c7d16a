"""fxopt.backends: things that run a result — ``reference`` (eager PyTorch) and ``ort`` (ONNX Runtime)."""
from .ort import OrtBackend
from .reference import ReferenceBackend

BACKENDS = {"reference": ReferenceBackend, "ort": OrtBackend}

__all__ = ["OrtBackend", "ReferenceBackend", "BACKENDS"]
