"""fxopt.passes: the pass contract, the registry, pipelines as text, the manager and instruments.

Every pass module registers itself on import; importing this package makes all of them
available by name (``fxopt.passes.registry()``).
"""
from .base import (NotApplicable, Pass, PassContext, PassError, PassResult, PostconditionError, PreconditionError,
                   get_pass_class, register_pass, registry)
from .instruments import Bisect, Dump, Instrument, PassRecord, PrintAfter, diff_records
from .manager import PassFailedError, PassManager, measure_drift, run_passes
from .pipeline import PRESETS, PipelineSyntaxError, check_order, format_pipeline, make_pass, parse_pipeline, resolve

# Passes (each registers itself).
from . import dce, cse, constant_folding, smoothquant, insert_qdq, fuse_qdq, nm_sparsity  # noqa: E402,F401
from . import moe_profile, moe_recompile, moe_prune_experts  # noqa: E402,F401
from . import permute_channels  # noqa: E402,F401
from . import nm_finetune  # noqa: E402,F401
from . import kv_cache  # noqa: E402,F401

__all__ = ["Pass", "PassResult", "PassContext", "PassError", "PreconditionError", "PostconditionError",
           "NotApplicable", "register_pass", "registry", "get_pass_class", "PassManager", "PassFailedError",
           "run_passes", "measure_drift", "PassRecord", "Instrument", "PrintAfter", "Dump", "Bisect",
           "diff_records", "parse_pipeline", "format_pipeline", "make_pass", "resolve", "check_order", "PRESETS",
           "PipelineSyntaxError"]
