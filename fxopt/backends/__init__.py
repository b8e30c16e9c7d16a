"""fxopt.backends: things that run a result — ``reference`` (eager PyTorch), ``ort`` (ONNX Runtime)
and ``cpu-int8`` (PyTorch's oneDNN integer GEMMs for fuse-qdq's linears)."""
from .cpu_int8 import CpuInt8Backend
from .ort import OrtBackend
from .reference import ReferenceBackend

BACKENDS = {"reference": ReferenceBackend, "ort": OrtBackend, "cpu-int8": CpuInt8Backend}

__all__ = ["OrtBackend", "ReferenceBackend", "CpuInt8Backend", "BACKENDS"]
