"""fxopt.nn: reference layers users build models from (and that fxopt's passes recognize)."""
from .moe import MoELayer

__all__ = ["MoELayer"]
