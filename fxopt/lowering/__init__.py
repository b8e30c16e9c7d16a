"""fxopt.lowering: GraphModule → ONNX (dynamo exporter + fxopt's translation table)."""
from .onnx_export import ExportReport, LoweringError, export_onnx
from .onnx_ops import OPSET, TRANSLATIONS, check_lowerable

__all__ = ["export_onnx", "ExportReport", "LoweringError", "TRANSLATIONS", "OPSET", "check_lowerable"]
