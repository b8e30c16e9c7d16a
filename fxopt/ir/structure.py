"""Structure analysis: the groups of nodes a rewrite must treat together, derived from the graph.

Nothing here looks at module names: groups come from data flow, so a renamed or unusual model
is analysed the same way as a stock HF one, and what cannot be proven safe is reported with a
reason instead of being guessed.

* :func:`linears` — every ``aten.linear`` whose weight is a parameter (``get_attr``).
* :func:`norms` — LayerNorm, ``aten.rms_norm`` and the hand-written RMSNorm
  (``w · (x · rsqrt(mean(x²) + ε))``, as Llama/SmolLM2 write it).
* :func:`norm_groups` — each norm and *all* the consumers of its output, split into linears and
  others (a residual add, a router, ...): SmoothQuant may fold into the norm only when every
  consumer is compensated.
* :func:`channel_groups` — producer/consumer channel coupling: linears whose output channels
  flow, through channel-preserving ops, into other linears' input channels (FFN fc1 → act → fc2;
  gate·up → down). Channels that reach a reshape, a residual add, a graph output or any op we do
  not model make the group *escape*, with the reason.
* :func:`shared_parameters` — tensors read by more than one op or under more than one name
  (tied embeddings): a pass must not rescale them in place.
* :func:`expert_weights` — 3-D parameters ``[E, ·, ·]`` read by a batched or grouped matmul (MoE
  experts stacked in one tensor: HF transformers 5's ``grouped_mm`` / ``batched_mm`` experts,
  ``fxopt::moe``), with the dim each matmul reduces over.
* :func:`weight_coverage` — how many of the weights a weight-rewriting pass could touch (linear
  weights and expert weights) it did touch, by count and by bytes, and which it left.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import networkx as nx
import torch
import torch.fx

from .graph import attr_meta, get_attr, storage_key
from .meta import describe, module_path

aten = torch.ops.aten

#: Ops that only move or recast a value: a consumer behind them still sees the same channels.
TRANSPARENT = {
    aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.dropout.default,
    aten.type_as.default, aten.lift_fresh_copy.default,
}
#: Ops that read a tensor for checks only.
IGNORED_USERS = {aten._assert_tensor_metadata.default, aten.sym_size.int, aten.sym_numel.default}
#: Elementwise ops of one tensor (other args are scalars): channels pass through unchanged.
UNARY = {
    aten.relu.default, aten.gelu.default, aten.silu.default, aten.tanh.default, aten.sigmoid.default,
    aten.neg.default, aten.abs.default, aten.exp.default, aten.erf.default, aten.sqrt.default,
    aten.pow.Tensor_Scalar, aten.hardtanh.default, aten.leaky_relu.default, aten.softplus.default,
    aten.clamp.default, aten.mish.default, aten.hardswish.default, aten.elu.default,
    aten.mul.Scalar, aten.add.Scalar, aten.div.Scalar, aten.sub.Scalar,
}
#: Reshapes: they keep the channels when the last dim is unchanged (row-major order keeps
#: ``flat_index mod C``), e.g. GPT-2's ``view(-1, C)`` around its Conv1D.
RESHAPES = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.unflatten.int, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
}
#: Elementwise ops of two tensors (broadcasting).
BINARY = {aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.div.Tensor}


@dataclass
class LinearInfo:
    node: torch.fx.Node
    weight: str                  # get_attr target of the weight, [out, in]
    bias: str | None
    in_features: int
    out_features: int

    @property
    def path(self) -> str:
        return module_path(self.node) or self.node.name


@dataclass
class NormInfo:
    node: torch.fx.Node          # the node whose output is the normalized, scaled value
    kind: str                    # "layer_norm" | "rms_norm"
    weight: str | None
    bias: str | None

    @property
    def path(self) -> str:
        return module_path(self.node) or self.node.name


@dataclass
class NormGroup:
    norm: NormInfo
    linears: list[LinearInfo]
    others: list[torch.fx.Node]  # consumers that are not linears reading the value as input

    @property
    def only_linears(self) -> bool:
        return bool(self.linears) and not self.others


@dataclass
class ChannelGroup:
    """Linears sharing one channel space: producers' output rows ↔ consumers' input columns."""

    producers: list[LinearInfo]
    consumers: list[LinearInfo]
    params: list[tuple[str, int]] = field(default_factory=list)  # (target, dim) that carry the channels too
    escapes: list[str] = field(default_factory=list)
    channels: int = 0

    @property
    def permutable(self) -> bool:
        return not self.escapes and bool(self.consumers)


@dataclass
class SharedParam:
    targets: list[str]
    users: list[torch.fx.Node]


# --------------------------------------------------------------------------- helpers


def _is_call(n, targets) -> bool:
    return isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in targets


def _strip(n: torch.fx.Node) -> torch.fx.Node:
    """Walk up through transparent ops (casts, clones)."""
    while _is_call(n, TRANSPARENT):
        n = n.args[0]
    return n


def _val(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def compute_users(n: torch.fx.Node) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(user, the node it reads) for every real user of ``n``, looking through transparent ops."""
    out = []
    stack = [n]
    seen = set()
    while stack:
        cur = stack.pop()
        for u in cur.users:
            if u in seen:
                continue
            seen.add(u)
            if _is_call(u, IGNORED_USERS):
                continue
            if _is_call(u, TRANSPARENT) and u.args[0] is cur:
                stack.append(u)
            elif _is_call(u, RESHAPES) and u.args[0] is cur and _last_dim(u) is not None \
                    and _last_dim(u) == _last_dim(cur):
                stack.append(u)          # GPT-2's view(-1, C) around its Conv1D keeps the channels
            else:
                out.append((u, cur))
    return out


# --------------------------------------------------------------------------- linears and norms


def linears(gm: torch.fx.GraphModule) -> list[LinearInfo]:
    out = []
    for n in gm.graph.nodes:
        if not _is_call(n, {aten.linear.default}):
            continue
        w = n.args[1]
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
            continue
        if b is not None and not (isinstance(b, torch.fx.Node) and b.op == "get_attr"):
            continue
        wt = get_attr(gm, w.target)
        out.append(LinearInfo(n, w.target, b.target if b is not None else None, wt.shape[1], wt.shape[0]))
    return out


def linear_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> LinearInfo | None:
    for info in linears(gm):
        if info.node is node:
            return info
    return None


def _attr(n) -> str | None:
    return n.target if isinstance(n, torch.fx.Node) and n.op == "get_attr" else None


def norms(gm: torch.fx.GraphModule) -> list[NormInfo]:
    out = []
    for n in gm.graph.nodes:
        if _is_call(n, {aten.layer_norm.default}):
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            b = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
            out.append(NormInfo(n, "layer_norm", _attr(w), _attr(b)))
        elif _is_call(n, {aten.rms_norm.default}):
            w = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
            out.append(NormInfo(n, "rms_norm", _attr(w), None))
        elif _is_call(n, {aten.mul.Tensor}):
            info = _manual_rms_norm(gm, n)
            if info:
                out.append(info)
    return out


def _manual_rms_norm(gm, n: torch.fx.Node) -> NormInfo | None:
    """``mul(w, cast(mul(x, rsqrt(add(mean(pow(x, 2)), eps)))))`` in either operand order."""
    a, b = n.args[0], n.args[1]
    for w, x in ((a, b), (b, a)):
        if _attr(w) is None or not isinstance(x, torch.fx.Node):
            continue
        wt = get_attr(gm, w.target)
        if wt.dim() != 1:
            continue
        inner = _strip(x)
        if not _is_call(inner, {aten.mul.Tensor}):
            continue
        for r in inner.args:
            if _is_call(r, {aten.rsqrt.default}):
                s = r.args[0]
                if _is_call(s, {aten.add.Tensor, aten.add.Scalar}):
                    s = s.args[0]
                if _is_call(s, {aten.mean.dim}) and _is_call(s.args[0], {aten.pow.Tensor_Scalar}):
                    return NormInfo(n, "rms_norm", w.target, None)
    return None


def norm_groups(gm: torch.fx.GraphModule) -> list[NormGroup]:
    """Each norm with every consumer of its output (through casts), linears separated."""
    groups = []
    for info in norms(gm):
        lins, others = [], []
        for user, via in compute_users(info.node):
            li = linear_of(gm, user) if _is_call(user, {aten.linear.default}) else None
            if li is not None and user.args[0] is via:
                lins.append(li)
            else:
                others.append(user)
        groups.append(NormGroup(info, lins, others))
    return groups


# --------------------------------------------------------------------------- channel coupling


def channel_groups(gm: torch.fx.GraphModule) -> list[ChannelGroup]:
    """Group linears by shared channel space (see module docstring).

    Graph construction: every linear output is a seed. From each node carrying the channels we
    follow its users: transparent and unary ops carry them on; a binary elementwise op with a
    parameter of ``C`` channels makes that parameter a member; with a tensor broadcast along the
    channels (last dim 1) it carries them; with another channel-carrying tensor it *joins* the
    two spaces (gated MLPs). A linear reading the value as its input is a consumer. Anything
    else is an escape. Connected components of the join graph (networkx) are the groups.
    """
    lin_by_node = {li.node: li for li in linears(gm)}
    g = nx.Graph()
    forward: set[torch.fx.Node] = set(lin_by_node)
    consumers: dict[torch.fx.Node, list[LinearInfo]] = {}
    params: dict[torch.fx.Node, list[tuple[str, int]]] = {}
    escapes: dict[torch.fx.Node, list[str]] = {}
    channels: dict[torch.fx.Node, int] = {}

    stack = list(lin_by_node)
    for s in stack:
        g.add_node(s)
        channels[s] = lin_by_node[s].out_features
    visited = set()
    while stack:
        n = stack.pop()
        if n in visited:
            continue
        visited.add(n)
        c = channels.get(n)
        for u in list(n.users):
            if _is_call(u, IGNORED_USERS):
                continue
            reason = None
            if u.op == "output":
                reason = "is a graph output"
            elif u in lin_by_node and u.args[0] is n:
                consumers.setdefault(n, []).append(lin_by_node[u])
                continue
            elif _is_call(u, TRANSPARENT | UNARY) and u.args[0] is n:
                _carry(g, n, u, stack, forward, channels, c)
                continue
            elif _is_call(u, RESHAPES) and u.args[0] is n and _last_dim(u) == c == _last_dim(n):
                _carry(g, n, u, stack, forward, channels, c)
                continue
            elif _is_call(u, BINARY) and len(u.args) >= 2:
                other = u.args[1] if u.args[0] is n else u.args[0]
                ov = _val(other)
                if not isinstance(other, torch.fx.Node) or ov is None or ov.dim() == 0 or ov.shape[-1] == 1:
                    _carry(g, n, u, stack, forward, channels, c)        # scalar / broadcast along channels
                    continue
                if other.op == "get_attr" and ov.shape[-1] == c and all(d == 1 for d in ov.shape[:-1]):
                    params.setdefault(n, []).append((other.target, ov.dim() - 1))
                    _carry(g, n, u, stack, forward, channels, c)
                    continue
                if ov.shape[-1] == c:
                    g.add_edge(other, u)                               # join: other must carry these channels too
                    _carry(g, n, u, stack, forward, channels, c)
                    continue
                reason = f"meets a tensor of shape {tuple(ov.shape)} in {describe(u)}"
            else:
                reason = f"flows into {describe(u)}"
            escapes.setdefault(n, []).append(f"{describe(n)} {reason}")

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = []
    for comp in nx.connected_components(g):
        comp = sorted(comp, key=lambda m: order.get(m, -1))
        seeds = [m for m in comp if m in lin_by_node]
        if not seeds:
            continue
        grp = ChannelGroup(
            producers=sorted((lin_by_node[m] for m in seeds), key=lambda li: li.node.name),
            consumers=[],
            channels=channels.get(seeds[0], 0),
        )
        for li in grp.producers:
            if li.bias:
                grp.params.append((li.bias, 0))
        for m in comp:
            grp.consumers += consumers.get(m, [])
            grp.params += params.get(m, [])
            grp.escapes += escapes.get(m, [])
            if m not in forward:
                grp.escapes.append(f"{describe(m)} joins the channels but is not computed from a linear of this group")
        if len({li.out_features for li in grp.producers}) > 1:
            grp.escapes.append("producers disagree on the channel count")
        grp.consumers = sorted({id(c): c for c in grp.consumers}.values(), key=lambda li: li.node.name)
        groups.append(grp)
    groups.sort(key=lambda gr: gr.producers[0].node.name)
    return groups


def _last_dim(n) -> int | None:
    v = _val(n)
    return int(v.shape[-1]) if v is not None and v.dim() > 0 else None


def _carry(g, n, u, stack, forward, channels, c):
    g.add_edge(n, u)
    forward.add(u)
    channels[u] = c
    stack.append(u)


# --------------------------------------------------------------------------- sharing


def shared_parameters(gm: torch.fx.GraphModule) -> list[SharedParam]:
    """Tensors read by more than one compute op, or aliased under several names (tied weights)."""
    by_storage: dict[tuple, list[torch.fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        t = attr_meta(gm, n.target)                      # never loads an offloaded weight
        if not isinstance(t, torch.Tensor):
            continue
        key = storage_key(gm, n.target)                  # offloaded: its file; in memory: its storage
        by_storage.setdefault(key, []).append(n)
    out = []
    for nodes in by_storage.values():
        users = []
        for n in nodes:
            users += [u for u, _ in compute_users(n)]
        users = list(dict.fromkeys(users))
        targets = sorted({n.target for n in nodes})
        if len(users) > 1 or (len(targets) > 1 and users):
            out.append(SharedParam(targets, users))
    return out


def is_shared(gm: torch.fx.GraphModule, target: str) -> bool:
    return any(target in sp.targets for sp in shared_parameters(gm))


# --------------------------------------------------------------------------- linear scaling paths


#: Ops through which a per-channel scale of one operand passes unchanged to the result.
_SCALE_THROUGH = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Scalar}


def scales_linearly(producer: torch.fx.Node, consumers: list[LinearInfo]) -> bool:
    """True if scaling ``producer``'s output channels by ``1/s`` scales the consumers' inputs by ``1/s``.

    The walk from the producer may pass casts, last-dim-preserving reshapes, and products with
    other tensors (``silu(gate) · up``: the product is linear in ``up``); it must end at the
    consumers' inputs. Any other op (an activation, an add) breaks linearity.
    """
    targets = {c.node for c in consumers}
    stack, seen = [producer], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _is_call(u, IGNORED_USERS):
                continue
            if u in targets and u.args[0] is n:
                continue
            if _is_call(u, TRANSPARENT) and u.args[0] is n:
                stack.append(u)
            elif _is_call(u, RESHAPES) and u.args[0] is n and _last_dim(u) == _last_dim(n):
                stack.append(u)
            elif _is_call(u, {aten.mul.Tensor}):
                stack.append(u)
            elif _is_call(u, {aten.mul.Scalar, aten.div.Scalar}) and u.args[0] is n:
                stack.append(u)
            elif _is_call(u, {aten.div.Tensor}) and u.args[0] is n and u.args[1] is not n:
                stack.append(u)
            else:
                return False
    return True


@dataclass
class ValueOutputPair:
    """An attention block's V projection and the output projection that reads its heads."""

    value: LinearInfo
    output: LinearInfo
    heads: int
    rep: int = 1          # query heads per KV head (GQA): O column (g, j) reads V channel (g // rep, j)


def value_output_pairs(gm: torch.fx.GraphModule) -> tuple[list[ValueOutputPair], list[str]]:
    """V→O pairs whose channels map one to one (multi-head attention without shared KV heads).

    The walk from V must be: reshape to ``[..., H, D]`` → transpose → the *value* of
    ``scaled_dot_product_attention`` (same number of heads as the query: no GQA) → transpose →
    reshape to ``[..., H·D]`` → the output linear. Attention is linear in V per channel, so a
    scale of V's output channel ``c`` reaches O's input column ``c`` unchanged. Returns the pairs
    and the reasons other V-like linears were skipped.
    """
    lins = {li.node: li for li in linears(gm)}
    pairs, skipped = [], []
    for sdpa in gm.graph.nodes:
        if not _is_call(sdpa, {aten.scaled_dot_product_attention.default}):
            continue
        v = sdpa.args[2]
        chain_v = []
        while _is_call(v, TRANSPARENT | RESHAPES | {aten.transpose.int, aten.permute.default, aten.expand.default,
                                                       aten.contiguous.default}) or _is_full_slice(v):
            if not _is_full_slice(v):                    # dynamic captures keep x[:, :] as no-op slices
                chain_v.append(v)
            v = v.args[0]
        if v not in lins:
            continue
        vinfo = lins[v]
        qv, vv = _val(sdpa.args[0]), _val(sdpa.args[2])
        if qv is None or vv is None or qv.dim() != 4 or vv.dim() != 4:
            skipped.append(f"{vinfo.path}: attention is not 4-D [batch, heads, seq, dim]")
            continue
        chain_v, rep = _strip_repeat_kv(chain_v)
        gqa = sdpa.kwargs.get("enable_gqa", False) or (len(sdpa.args) > 7 and sdpa.args[7])
        if gqa and rep == 1 and isinstance(qv.shape[1], int) and isinstance(vv.shape[1], int) \
                and vv.shape[1] and qv.shape[1] % vv.shape[1] == 0:
            rep = qv.shape[1] // vv.shape[1]             # torch's own GQA: query head g reads KV head g // rep
        kv_heads = vv.shape[1] if gqa else vv.shape[1] // rep
        if rep < 1 or any(_is_call(c, {aten.expand.default}) for c in chain_v) \
                or qv.shape[1] != kv_heads * rep or kv_heads * vv.shape[3] != vinfo.out_features:
            skipped.append(f"{vinfo.path}: V reaches attention through an unrecognized head expansion")
            continue
        if not _transposes_swap_heads_and_seq(chain_v):
            skipped.append(f"{vinfo.path}: V reaches attention through an unrecognized reshape")
            continue
        n, chain_o = sdpa, []
        while len(n.users) == 1:
            u = next(iter(n.users))
            if u in lins:
                break
            if not (_is_call(u, TRANSPARENT | RESHAPES | {aten.transpose.int, aten.permute.default,
                                                          aten.contiguous.default}) or _is_full_slice(u)):
                break
            if not _is_full_slice(u):
                chain_o.append(u)
            n = u
        users = [u for u in n.users if u in lins and u.args[0] is n]
        if len(users) != 1 or len(n.users) != 1 or not _transposes_swap_heads_and_seq(chain_o):
            skipped.append(f"{vinfo.path}: the attention output does not reach one linear through a head merge")
            continue
        oinfo = lins[users[0]]
        if oinfo.in_features != vinfo.out_features * rep:
            skipped.append(f"{vinfo.path}: {oinfo.path} reads {oinfo.in_features} channels, V makes "
                           f"{vinfo.out_features} for {rep} query head(s) each")
            continue
        pairs.append(ValueOutputPair(vinfo, oinfo, int(kv_heads), int(rep)))
    return pairs, skipped


def _is_full_slice(n) -> bool:
    """``x[..., :, ...]``: a ``slice`` that keeps the whole dim (dynamic captures keep these)."""
    if not _is_call(n, {aten.slice.Tensor}):
        return False
    a, b = _val(n.args[0]), _val(n)
    step = n.args[4] if len(n.args) > 4 else 1
    start = n.args[2] if len(n.args) > 2 else 0
    return a is not None and b is not None and step == 1 and start in (0, None) and \
        tuple(a.shape) == tuple(b.shape)


def _strip_repeat_kv(chain: list[torch.fx.Node]) -> tuple[list[torch.fx.Node], int]:
    """Remove HF's ``repeat_kv`` (unsqueeze(2) → expand to ``[b, kv, rep, s, d]`` → reshape to
    ``[b, kv·rep, s, d]``) from a V chain (listed from attention back to V); returns the rest and ``rep``."""
    for i, n in enumerate(chain):
        if not _is_call(n, {aten.expand.default}):
            continue
        a, b = _val(n.args[0]), _val(n)
        if a is None or b is None or a.dim() != 5 or b.dim() != 5 or a.shape[2] != 1:
            return chain, 1
        if tuple(a.shape[:2]) != tuple(b.shape[:2]) or tuple(a.shape[3:]) != tuple(b.shape[3:]):
            return chain, 1
        before = chain[i + 1] if i + 1 < len(chain) else None
        after = chain[i - 1] if i > 0 else None
        if not (_is_call(before, {aten.unsqueeze.default}) and before.args[1] % 5 == 2 if before is not None else False):
            return chain, 1
        av = _val(after) if after is not None else None
        if not (_is_call(after, RESHAPES) and av is not None and av.dim() == 4
                and av.shape[1] == b.shape[1] * b.shape[2] and tuple(av.shape[2:]) == tuple(b.shape[3:])):
            return chain, 1
        return chain[:i - 1] + chain[i + 2:], int(b.shape[2])
    return chain, 1


def _transposes_swap_heads_and_seq(chain: list[torch.fx.Node]) -> bool:
    """The only reorderings allowed are head↔seq swaps ((1, 2) on 4-D values); reshapes only
    split or merge the last dim into [heads, dim]."""
    for n in chain:
        if _is_call(n, {aten.transpose.int}):
            dims = sorted(d % 4 for d in n.args[1:3])
            if dims != [1, 2]:
                return False
        elif _is_call(n, {aten.permute.default}):
            if [d % 4 for d in n.args[1]] != [0, 2, 1, 3]:
                return False
        elif _is_call(n, RESHAPES):
            a, b = _val(n.args[0]), _val(n)
            if a is None or b is None:
                return False
            small, big = (a, b) if a.dim() < b.dim() else (b, a)
            if not (big.dim() == small.dim() + 1 and tuple(big.shape[:-2]) == tuple(small.shape[:-1])
                    and big.shape[-2] * big.shape[-1] == small.shape[-1]):
                if tuple(a.shape) != tuple(b.shape):
                    return False
    return True


# --------------------------------------------------------------------------- expert weights and coverage


@dataclass
class ExpertWeight:
    """A stacked expert weight: ``E`` matrices in one 3-D parameter, each read by a matmul.

    ``in_dim`` (1 or 2) is the parameter's dim that the matmuls reduce over — each expert's input
    features, along which an N:M mask runs (2 for HF's ``[E, out, in]`` layout, 1 once a
    constant-folded transpose stores it ``[E, in, out]``)."""

    weight: str
    in_dim: int
    experts: int
    in_features: int             # per expert: the size of in_dim
    out_features: int            # per expert: the size of the other matrix dim
    users: list[torch.fx.Node]

    @property
    def path(self) -> str:
        """The parameter's name (``model.layers.0.mlp.experts.down_proj``); for a tensor a pass made
        (``_folded.transpose_4``) the module that reads it, with that name."""
        if not self.weight.startswith("_") or not self.users:
            return self.weight
        where = module_path(self.users[0])
        return f"{where} ({self.weight})" if where else self.weight


def _grouped_mm_ops() -> set:
    ops = set()
    for ns, name in (("transformers", "grouped_mm_fallback"), ("aten", "_grouped_mm")):
        try:
            ops.add(getattr(getattr(torch.ops, ns), name).default)
        except (AttributeError, RuntimeError):
            pass
    return ops


def _moe_op():
    try:
        return torch.ops.fxopt.moe.default
    except (AttributeError, RuntimeError):
        return None


#: ops through which an expert weight keeps its (expert, row, column) dims: casts, and indexing /
#: slicing along the expert dim (HF ``batched_mm`` gathers ``W[expert_ids]``)
_EXPERT_LAYOUT = TRANSPARENT | {aten.index.Tensor, aten.index_select.default, aten.select.int, aten.slice.Tensor}


def expert_weights(gm: torch.fx.GraphModule) -> tuple[list[ExpertWeight], list[str]]:
    """Every 3-D ``get_attr`` parameter read as the matrix operand of ``bmm`` / ``matmul`` /
    ``baddbmm`` / a grouped matmul / ``fxopt::moe``, with the dim it is reduced over.

    The walk from the parameter tracks where its two matrix dims are: transposes and permutes of
    the last two dims swap them; casts and indexing along dim 0 keep them. A weight whose matmuls
    disagree on the reduced dim, or that reaches any other op, is not returned; a note says why."""
    grouped, moe_op = _grouped_mm_ops(), _moe_op()
    out, notes = [], []
    for n in gm.graph.nodes:
        if n.op != "get_attr":
            continue
        t = attr_meta(gm, n.target)
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
            continue
        dims: set[int] = set()
        users: list[torch.fx.Node] = []
        why = ""
        stack = [(n, (1, 2))]               # (node, (param dim at -2, param dim at -1))
        seen = set()
        while stack:
            cur, (a, b) = stack.pop()
            for u in cur.users:
                if (u, cur) in seen or _is_call(u, IGNORED_USERS):
                    continue
                seen.add((u, cur))
                first = u.args[0] is cur if u.args else False
                if _is_call(u, _EXPERT_LAYOUT) and first and _keeps_matrix_dims(u, cur):
                    stack.append((u, (a, b)))
                elif first and _swaps_matrix_dims(u, cur):
                    stack.append((u, (b, a)))
                elif _is_call(u, {aten.bmm.default, aten.matmul.default}) and cur in u.args[:2]:
                    dims.add(a if u.args[1] is cur else b)      # right operand reduces its dim -2, left its -1
                    users.append(u)
                elif _is_call(u, {aten.baddbmm.default}) and cur in u.args[1:3]:
                    dims.add(a if u.args[2] is cur else b)
                    users.append(u)
                elif _is_call(u, grouped) and len(u.args) > 1 and u.args[1] is cur:
                    dims.add(a)                                  # grouped_mm(x [S, K], w [E, K, N])
                    users.append(u)
                elif moe_op is not None and _is_call(u, {moe_op}) and cur in u.args[2:4]:
                    dims.add(b)                                  # fxopt::moe: nn.Linear layout per expert
                    users.append(u)
                else:
                    why = why or f"reaches {describe(u)}"
        if not users:
            continue
        if why or len(dims) != 1:
            notes.append(f"3-D weight {n.target}: not treated as stacked expert weights: "
                         + (why or "its matmuls reduce over different dims"))
            continue
        d = dims.pop()
        out.append(ExpertWeight(n.target, d, int(t.shape[0]), int(t.shape[d]), int(t.shape[3 - d]), users))
    return out, notes


def _neg(d: int, n: torch.fx.Node) -> int:
    v = _val(n)
    return d - v.dim() if v is not None and d >= 0 else d


def _swaps_matrix_dims(u: torch.fx.Node, cur: torch.fx.Node) -> bool:
    """True when ``u`` transposes the last two dims of ``cur`` and keeps the others in place."""
    if _is_call(u, {aten.transpose.int}):
        return sorted(_neg(d, cur) for d in u.args[1:3]) == [-2, -1]
    if _is_call(u, {aten.permute.default}):
        dims = [_neg(d, cur) for d in u.args[1]]
        return dims[-2:] == [-1, -2] and all(d == i - len(dims) for i, d in enumerate(dims[:-2]))
    return False


def _keeps_matrix_dims(u: torch.fx.Node, cur: torch.fx.Node) -> bool:
    """True when ``u`` leaves the last two dims of ``cur`` as they are (casts; indexing dim 0)."""
    if _is_call(u, TRANSPARENT):
        return True
    a, b = _val(cur), _val(u)
    if a is None or b is None or a.dim() < 3 or b.dim() < 2 or tuple(a.shape[-2:]) != tuple(b.shape[-2:]):
        return False
    if _is_call(u, {aten.index.Tensor}):
        idx = u.args[1]
        return len(idx) == 1 and idx[0] is not None
    if _is_call(u, {aten.index_select.default, aten.select.int, aten.slice.Tensor}):
        return _neg(u.args[1], cur) == -a.dim()
    return False


class WeightCoverage(NamedTuple):
    """What share of the rewritable weights a pass touched (see :func:`weight_coverage`)."""

    n_touched: int
    n_eligible: int
    share: float                 # bytes of the touched weights / bytes of all eligible weights
    untouched: list[str]         # module paths (or names) of the eligible weights left as they were


def eligible_weights(gm: torch.fx.GraphModule) -> dict[str, str]:
    """``{weight target: module path}`` of the weights a weight rewrite (quantization, sparsity) applies
    to: every linear's weight parameter and every stacked expert weight (:func:`expert_weights`)."""
    out = {li.weight: li.path for li in linears(gm)}
    for ew in expert_weights(gm)[0]:
        out.setdefault(ew.weight, ew.path)
    return out


def weight_coverage(gm: torch.fx.GraphModule, touched: Iterable[str]) -> WeightCoverage:
    """How many of the eligible weights of ``gm`` (:func:`eligible_weights`) are in ``touched``
    (weight targets), and their share of the eligible bytes. Weights stored under several names
    (tied) count once, by storage; call it on the graph *before* a rewrite renames its weights."""
    eligible = eligible_weights(gm)
    touched = set(touched)
    by_key: dict[tuple, list[str]] = {}
    for target in eligible:
        by_key.setdefault(storage_key(gm, target), []).append(target)
    hit = total = 0
    n_hit = 0
    untouched = []
    for key, targets in by_key.items():
        t = attr_meta(gm, targets[0])
        size = t.numel() * t.element_size()
        total += size
        if any(x in touched for x in targets):
            hit += size
            n_hit += 1
        else:
            untouched.append(eligible[targets[0]])
    return WeightCoverage(n_hit, len(by_key), round(hit / total, 6) if total else 1.0, untouched)
