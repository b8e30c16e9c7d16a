"""Serving what was built: the generation loop over a decode-step graph (:mod:`fxopt.runtime.generate`), and an
ONNX decoder run with IO binding and an in-place KV cache (:mod:`fxopt.runtime.ort_decoder`)."""
from .generate import generate, ort_step
from .ort_decoder import CacheHandle, OrtDecoder

__all__ = ["CacheHandle", "OrtDecoder", "generate", "ort_step"]
