"""``fxopt::attention`` — scaled dot-product attention in the form ONNX Runtime fuses.

``attention(q, k, v, mask, scale, num_heads, mask_kind)`` with ``q [B, H, S, D]``, ``k [B, H, T, D]``,
``v [B, H, T, Dv]`` computes ``softmax(q kᵀ · scale + bias) v`` per head, where

* ``mask_kind = 0``: no mask, ``bias = 0``;
* ``mask_kind = 1``: ``mask`` is a boolean keep-mask broadcastable to ``[B, H, S, T]``;
  ``bias = 0`` where kept and the float32 minimum elsewhere (finite, so a row that keeps no key
  makes no NaN), and such rows are multiplied by 0 at the end — the zeros PyTorch's fused
  ``scaled_dot_product_attention`` returns for them;
* ``mask_kind = 2``: ``mask`` is an additive float bias broadcastable to ``[B, H, S, T]``;
* ``mask_kind = 3``: causal, no mask (SDPA's ``is_causal=True`` with ``S = T``: query ``i`` sees keys
  ``≤ i``), ONNX Runtime's ``unidirectional=1``.

In PyTorch it runs ``torch.nn.functional.scaled_dot_product_attention`` itself, so replacing an
eligible SDPA node by it (:func:`fxopt.lowering.attention.fuse_attention`) changes no number except
the order of additions. Its ONNX form (:mod:`fxopt.lowering.onnx_ops`) is ONNX Runtime's
``com.microsoft.MultiHeadAttention``: one kernel for QKᵀ, the bias, softmax and PV, instead of
the ten-odd nodes (transposes, MatMul, Where/IsNaN masking, Softmax) the exporter writes for SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

MASK_NONE, MASK_BOOL, MASK_ADDITIVE, MASK_CAUSAL = 0, 1, 2, 3
FILL = float(torch.finfo(torch.float32).min)


@torch.library.custom_op("fxopt::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, num_heads: int,
              mask_kind: int) -> Tensor:
    if mask_kind == MASK_BOOL:
        bias = torch.where(mask, torch.zeros((), dtype=q.dtype), torch.full((), FILL, dtype=q.dtype))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return out * mask.any(-1, keepdim=True).to(out.dtype)
    if mask_kind == MASK_ADDITIVE:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask_kind == MASK_CAUSAL:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).clone()


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, num_heads, mask_kind):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


ATTENTION = torch.ops.fxopt.attention.default
