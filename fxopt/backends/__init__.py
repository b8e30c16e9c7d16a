"""fxopt.backends: things that run a result — ``reference`` (eager PyTorch), ``ort`` (ONNX Runtime),
``cpu-int8`` (PyTorch's oneDNN integer GEMMs for fuse-qdq's linears) and ``sparse24`` (nm-sparsity's
2:4 linears as semi-structured sparse GEMMs on CUDA; its ``lint`` runs on CPU)."""
from .cpu_int8 import CpuInt8Backend
from .ort import OrtBackend
from .reference import ReferenceBackend
from .sparse24 import Sparse24Backend

BACKENDS = {"reference": ReferenceBackend, "ort": OrtBackend, "cpu-int8": CpuInt8Backend, "sparse24": Sparse24Backend}

__all__ = ["OrtBackend", "ReferenceBackend", "CpuInt8Backend", "Sparse24Backend", "BACKENDS"]
