"""fxopt — a torch.fx pass pipeline that makes transformer inference cheaper.

    import fxopt
    result = fxopt.optimize(model, passes="cleanup", example_inputs=inputs)
    print(result.report())
    result.export_onnx("model.onnx")
"""
from . import backends, ir, lowering, passes
from .api import OptimizeResult, format_records, optimize
from .ir.capture import CaptureError, capture
from .lowering import ExportReport, LoweringError, export_onnx
from .passes import PassError, PassManager, parse_pipeline

__version__ = "0.1.0"

__all__ = ["optimize", "OptimizeResult", "capture", "CaptureError", "export_onnx", "ExportReport", "LoweringError",
           "PassManager", "PassError", "parse_pipeline", "format_records", "ir", "passes", "lowering", "backends"]
