"""fxopt.ir: the one representation every pass shares (capture, metadata, structure, Q/DQ ops)."""
from . import meta, qops, structure
from .capture import CaptureError, capture
from .graph import ExampleInputs, flatten_tensors, get_attr, graph_text, op_histogram, parameter_bytes, set_attr

__all__ = ["capture", "CaptureError", "ExampleInputs", "flatten_tensors", "get_attr", "set_attr", "graph_text",
           "op_histogram", "parameter_bytes", "meta", "qops", "structure"]
