"""Serving what was built: the generation loop over a decode-step graph (:mod:`fxopt.runtime.generate`)."""
from .generate import generate, ort_step

__all__ = ["generate", "ort_step"]
