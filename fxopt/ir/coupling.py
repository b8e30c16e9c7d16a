"""Channel coupling for permutations: which parameter slices move together, derived from the graph.

A permutation ``π`` of a channel space is free (the graph computes the same function) when every
tensor that indexes those channels is permuted the same way: the producers' weight rows and
biases, per-channel parameters on the way, and the consumers' weight columns. This module finds
those groups and applies a permutation to one. Everything is found from data flow (no module
names); what cannot be proven safe is returned with a reason, never guessed.

Coupling rules (``kind`` of :class:`CoupledGroup`):

1. **ffn** — ``fc1 → elementwise → fc2`` and ``gate, up → silu(gate)·up → down``: the groups of
   :func:`fxopt.ir.structure.channel_groups` (with its escapes: residual adds, graph outputs, ops
   not modelled). Any permutation of the ``C`` hidden channels.
2. **value-output** — per attention (``aten.scaled_dot_product_attention``): V's rows ↔ O's
   columns. Attention mixes positions, never channels, so within each head a permutation of the
   ``d_v`` channels of V reaches O's input columns unchanged. The permutation must be
   block-diagonal (each head's channels stay in that head: moving V channels across heads would
   pair them with another head's attention weights). With grouped-query attention (``n_rep``
   query heads per KV head) a V head feeds the O columns of every query head that uses it, so
   each O block of that KV group takes the same within-head permutation (several *copies*).
3. **query-key** — Q's rows ↔ K's rows within each head: ``q·k = Σ_j q_j k_j`` is unchanged when
   the ``j`` of one head are permuted in both. With GQA the query heads of a group take their KV
   head's permutation. With rotary embeddings (RoPE, ``x·cos + rotate_half(x)·sin``, which rotates
   the channel pairs ``(i, i + d/2)`` by a pair-specific angle) the within-head permutation must
   move pairs together (``p[i + d/2] = p[i] + d/2``), must be the same for every head (the
   cos/sin tables are shared by the heads), and the tables must be re-indexed too: applying it
   inserts ``index_select(table, -1, p)`` before the RoPE products of this attention only.
4. **whole heads** — :func:`permute_heads` moves whole KV heads (with their query heads) across
   Q, K, V rows and O column blocks at once: exact because each head is computed independently.

Tracing accepts between a projection and the attention: casts/clones, ``split``/``chunk``/
``slice`` along the last dim of a fused projection (GPT-2's ``c_attn``: each part is a row range),
the head split ``view(..., H, D)``, the head↔sequence ``transpose(1, 2)``, HF's ``repeat_kv``
(``unsqueeze → expand → reshape``) or ``enable_gqa``, and the RoPE pattern above; after the
attention, the transpose back, the head merge ``reshape(..., H·D)`` and last-dim-preserving views.
Anything else refuses the attention's groups with a reason naming the node. Residual streams and
graph outputs are never permuted (rule 1's escapes; rules 2-3 end at linears).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from .graph import add_constant, get_attr, set_attr
from .meta import SOURCE_PATH, describe, module_path
from .structure import (IGNORED_USERS, RESHAPES, TRANSPARENT, LinearInfo, _is_call, _is_full_slice, _val, channel_groups, linears,
                        shared_parameters)

aten = torch.ops.aten

_SDPA = {aten.scaled_dot_product_attention.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}


@dataclass
class Member:
    """A parameter slice that carries the group's channels.

    ``index[r, c]`` is where channel ``c`` sits along ``dim`` in copy ``r`` of this tensor (GQA's
    query heads and O blocks are several copies of one KV head's channels)."""

    target: str
    dim: int
    index: torch.Tensor                 # LongTensor [copies, channels]
    role: str                           # "rows" (producer weight/bias), "columns" (consumer weight), "param"
    linear: LinearInfo | None = None


@dataclass
class CoupledGroup:
    """Parameters sharing one channel space; a permutation of it must be applied to all members."""

    kind: str                           # "ffn" | "value-output" | "query-key"
    name: str                           # module path of the first producer, for notes
    channels: int
    head_dim: int                       # permutations stay inside blocks of head_dim channels
    members: list[Member] = field(default_factory=list)
    rope: list[tuple[torch.fx.Node, torch.fx.Node]] = field(default_factory=list)  # (RoPE mul, cos/sin table)
    reasons: list[str] = field(default_factory=list)
    attention: torch.fx.Node | None = None

    @property
    def permutable(self) -> bool:
        return not self.reasons and (self.kind == "query-key" or any(mb.role == "columns" for mb in self.members))

    @property
    def heads(self) -> int:
        return self.channels // self.head_dim if self.head_dim else 0

    @property
    def producers(self) -> list[LinearInfo]:
        return _unique([mb.linear for mb in self.members if mb.role == "rows" and mb.linear is not None])

    @property
    def consumers(self) -> list[LinearInfo]:
        return _unique([mb.linear for mb in self.members if mb.role == "columns" and mb.linear is not None])

    def paths(self) -> list[str]:
        return [li.path for li in _unique(self.producers + self.consumers)]

    def consumer_matrix(self, gm: torch.fx.GraphModule,
                        column_scale: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``|w|`` of every consumer column, stacked row-wise: ``[Σ rows, channels]``; column ``c`` holds
        all the weights an N:M mask of a consumer sees for channel ``c``. ``column_scale`` maps a
        consumer weight's target to a factor per input column (the RMS of its input channels, for
        activation-aware scores): those columns are multiplied by it."""
        parts = []
        for mb in self.members:
            if mb.role != "columns":
                continue
            w = get_attr(gm, mb.target).detach().to(torch.float32).abs()
            scale = (column_scale or {}).get(mb.target)
            for r in range(mb.index.shape[0]):
                cols = w.index_select(mb.dim, mb.index[r])
                if scale is not None:
                    f = scale.to(torch.float32)[mb.index[r]]
                    cols = cols * (f.unsqueeze(0) if mb.dim == cols.dim() - 1 else f.unsqueeze(-1))
                parts.append(cols)
        if not parts:
            return torch.zeros(0, self.channels)
        return torch.cat(parts, 0)

    def check_permutation(self, perm: torch.Tensor, *, head_moves: bool = False) -> torch.Tensor | None:
        """Raise ValueError unless ``perm`` is allowed; returns the within-head RoPE permutation (or None)."""
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.shape != (self.channels,) or not torch.equal(perm.sort().values, torch.arange(self.channels)):
            raise ValueError(f"{self.name}: not a permutation of {self.channels} channels")
        d = self.head_dim
        blocks = perm.view(-1, d)
        src_head = blocks // d
        if not bool((src_head == src_head[:, :1]).all()):
            raise ValueError(f"{self.name}: the permutation moves channels across heads of {d} channels")
        if not head_moves and not torch.equal(src_head[:, 0], torch.arange(self.heads)):
            raise ValueError(f"{self.name}: whole-head moves must go through permute_heads (Q, K, V and O together)")
        if not self.rope:
            return None
        within = blocks - src_head * d
        if not bool((within == within[:1]).all()):
            raise ValueError(f"{self.name}: with RoPE every head must take the same within-head permutation "
                             "(the cos/sin tables are shared by the heads)")
        p, h = within[0], d // 2
        if not (bool((p[:h] < h).all()) and torch.equal(p[h:], p[:h] + h)):
            raise ValueError(f"{self.name}: with RoPE the permutation must move the channel pairs (i, i+{h}) together")
        return p


@dataclass
class Attention:
    """One ``scaled_dot_product_attention`` and the groups around it."""

    node: torch.fx.Node
    heads: int                           # query heads
    kv_heads: int
    qk: CoupledGroup | None
    vo: CoupledGroup | None
    reasons: list[str] = field(default_factory=list)

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads if self.kv_heads else 0


def _unique(items):
    out, seen = [], set()
    for it in items:
        if id(it) not in seen:
            seen.add(id(it))
            out.append(it)
    return out


# --------------------------------------------------------------------------- tracing into attention


@dataclass
class _Trace:
    linear: LinearInfo | None = None
    offset: int = 0                      # first row of this projection in the linear's output
    width: int = 0                       # channels of this projection (H·D)
    heads: int = 0                       # heads at the projection (before a GQA repeat)
    head_dim: int = 0
    rep: int = 1                         # GQA repeat between the projection and the attention
    rope: list[tuple[torch.fx.Node, torch.fx.Node]] = field(default_factory=list)
    nodes: list[torch.fx.Node] = field(default_factory=list)
    reason: str | None = None


def _shape(n) -> tuple[int, ...] | None:
    v = _val(n)
    return tuple(int(s) for s in v.shape) if v is not None else None


def _noop_reshape(n) -> bool:
    return _is_call(n, RESHAPES) and _shape(n) is not None and _shape(n) == _shape(n.args[0])


def _keeps_last_dim(n) -> bool:
    a, b = _shape(n.args[0]) if isinstance(n.args[0], torch.fx.Node) else None, _shape(n)
    return _is_call(n, RESHAPES) and a is not None and b is not None and len(a) > 0 and len(b) > 0 and a[-1] == b[-1]


def _is_head_swap(n) -> bool:
    if _is_call(n, {aten.transpose.int}):
        return sorted(d % 4 for d in n.args[1:3]) == [1, 2]
    if _is_call(n, {aten.permute.default}):
        return [d % 4 for d in n.args[1]] == [0, 2, 1, 3]
    return False


def _repeat_kv(n) -> tuple[torch.fx.Node, int, list[torch.fx.Node]] | None:
    """HF's ``repeat_kv``: reshape(expand(unsqueeze(x, 2), [B, Hkv, r, S, D]), [B, Hkv·r, S, D]).

    Dynamic-shape captures write the indexing ``x[:, :, None, :, :]`` with whole-dim ``slice`` nodes
    around the unsqueeze; those are skipped (and reported as part of the pattern)."""
    if not _is_call(n, RESHAPES):
        return None
    e = n.args[0]
    if not _is_call(e, {aten.expand.default}):
        return None
    skipped = []
    u = e.args[0]
    while _is_full_slice(u):
        skipped.append(u)
        u = u.args[0]
    if not (_is_call(u, {aten.unsqueeze.default}) and u.args[1] in (2, -3)):
        return None
    x = u.args[0]
    while _is_full_slice(x):
        skipped.append(x)
        x = x.args[0]
    xs, es, ns = _shape(x), _shape(e), _shape(n)
    if not (xs and es and ns and len(xs) == 4 and len(es) == 5 and len(ns) == 4):
        return None
    if es[1] != xs[1] or es[3:] != xs[2:] or ns != (es[0], es[1] * es[2], es[3], es[4]):
        return None
    return x, es[2], [n, e, u, *skipped]


def _rope(n) -> tuple[torch.fx.Node, list[tuple[torch.fx.Node, torch.fx.Node]], list[torch.fx.Node]] | None:
    """``x·cos + cat([-x[..., h:], x[..., :h]], -1)·sin`` (HF's rotate_half form), either operand order.

    Returns (x, [(mul node, table)], pattern nodes)."""
    if not _is_call(n, {aten.add.Tensor}) or len(n.args) < 2:
        return None
    for p1, p2 in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
        if not (_is_call(p1, {aten.mul.Tensor}) and _is_call(p2, {aten.mul.Tensor})):
            continue
        for rot, sin in ((p2.args[0], p2.args[1]), (p2.args[1], p2.args[0])):
            if not (_is_call(rot, {aten.cat.default}) and len(rot.args[0]) == 2):
                continue
            dim = rot.args[1] if len(rot.args) > 1 else 0
            xs = _shape(rot)
            if xs is None or dim % len(xs) != len(xs) - 1:
                continue
            neg, lo = rot.args[0]
            if not _is_call(neg, {aten.neg.default}):
                continue
            hi = neg.args[0]
            if not (_is_call(hi, {aten.slice.Tensor}) and _is_call(lo, {aten.slice.Tensor})):
                continue
            x = lo.args[0]
            if hi.args[0] is not x:
                continue
            d = xs[-1]
            h = d // 2
            if d % 2 or _slice_range(lo, d) != (0, h) or _slice_range(hi, d) != (h, d):
                continue
            if x in p1.args[:2]:
                cos = p1.args[1] if p1.args[0] is x else p1.args[0]
            else:
                continue
            if not all(_table_ok(t, d) for t in (cos, sin)):
                return None
            return x, [(p1, cos), (p2, sin)], [n, p1, p2, rot, neg, hi, lo]
    return None


def _slice_range(n, size: int) -> tuple[int, int] | None:
    args = list(n.args) + [None] * (5 - len(n.args))
    _, dim, start, end, step = args[:5]
    v = _shape(n.args[0])
    if v is None or (dim if dim is not None else 0) % len(v) != len(v) - 1 or (step not in (None, 1)):
        return None
    start = 0 if start is None else (start + size if start < 0 else start)
    end = size if end is None else min(end + size if end < 0 else end, size)
    return start, end


def _table_ok(t, d: int) -> bool:
    """A cos/sin table: a tensor whose last dim is the head dim and that is broadcast over heads."""
    s = _shape(t)
    return isinstance(t, torch.fx.Node) and s is not None and len(s) >= 1 and s[-1] == d and (
        len(s) < 3 or s[-3] == 1)


def _trace_in(x: torch.fx.Node, lins: dict, *, rope: bool) -> _Trace:
    """From an attention operand [B, H, S, D] up to the projection that makes it."""
    tr = _Trace()
    cur = x
    while True:                                               # [B, H, S, D]
        if _is_call(cur, TRANSPARENT) or _noop_reshape(cur):
            tr.nodes.append(cur)
            cur = cur.args[0]
            continue
        rk = _repeat_kv(cur) if tr.rep == 1 else None
        if rk is not None:
            cur, tr.rep = rk[0], tr.rep * rk[1]
            tr.nodes += rk[2]
            continue
        rp = _rope(cur) if rope and not tr.rope else None
        if rp is not None:
            cur, tr.rope = rp[0], rp[1]
            tr.nodes += rp[2]
            continue
        break
    if not _is_head_swap(cur):
        tr.reason = f"{describe(cur)} is not modelled between a projection and {describe(x)}'s attention"
        return tr
    tr.nodes.append(cur)
    cur = cur.args[0]
    while _is_call(cur, TRANSPARENT):                         # [B, S, H, D]
        tr.nodes.append(cur)
        cur = cur.args[0]
    a, b = (_shape(cur.args[0]), _shape(cur)) if _is_call(cur, RESHAPES) else (None, None)
    if not (a and b and len(b) == len(a) + 1 and a[:-1] == b[:-2] and b[-2] * b[-1] == a[-1]):
        tr.reason = f"{describe(cur)} is not a head split [..., H·D] → [..., H, D]"
        return tr
    tr.heads, tr.head_dim, tr.width = b[-2], b[-1], a[-1]
    tr.nodes.append(cur)
    cur = cur.args[0]
    while True:                                               # [..., H·D], maybe part of a fused projection
        if _is_call(cur, TRANSPARENT) or _keeps_last_dim(cur):
            tr.nodes.append(cur)
            cur = cur.args[0]
        elif cur.op == "call_function" and cur.target is operator.getitem and _is_call(cur.args[0], _SPLITS):
            part = _split_part(cur)
            if part is None:
                tr.reason = f"{describe(cur.args[0])} does not split the last dim into known sizes"
                return tr
            tr.offset += part
            tr.nodes += [cur, cur.args[0]]
            cur = cur.args[0].args[0]
        elif _is_call(cur, {aten.slice.Tensor}):
            size = _shape(cur.args[0])
            rng = _slice_range(cur, size[-1]) if size else None
            if rng is None:
                tr.reason = f"{describe(cur)} slices a dim other than the channels"
                return tr
            tr.offset += rng[0]
            tr.nodes.append(cur)
            cur = cur.args[0]
        elif cur in lins:
            tr.linear = lins[cur]
            return tr
        else:
            tr.reason = f"{describe(cur)} is not modelled between a projection and the attention"
            return tr


def _split_part(getitem: torch.fx.Node) -> int | None:
    """Offset, along the last dim, of ``getitem(split(x, ...), i)``."""
    sp, i = getitem.args
    s = _shape(sp.args[0])
    if s is None:
        return None
    dim = sp.args[2] if len(sp.args) > 2 else sp.kwargs.get("dim", 0)
    if dim % len(s) != len(s) - 1:
        return None
    c = s[-1]
    if sp.target is aten.split_with_sizes.default:
        sizes = list(sp.args[1])
    elif sp.target is aten.chunk.default:
        k = sp.args[1]
        step = -(-c // k)
        sizes = [min(step, c - j * step) for j in range(k) if c - j * step > 0]
    else:
        step = sp.args[1]
        sizes = [min(step, c - j) for j in range(0, c, step)]
    return sum(sizes[:i])


def _trace_out(sdpa: torch.fx.Node, lins: dict) -> tuple[LinearInfo | None, list[torch.fx.Node], str | None]:
    """From the attention output [B, H, S, Dv] down to the one linear reading the merged heads."""
    nodes, cur = [], sdpa
    stage = 0                                                 # 0: [B,H,S,D]  1: [B,S,H,D]  2: [B,S,H·D]
    while True:
        users = [u for u in cur.users if not _is_call(u, IGNORED_USERS)]
        if len(users) != 1:
            return None, nodes, (f"{describe(cur)} has {len(users)} users; the attention output must reach one "
                                 "linear through a head merge")
        u = users[0]
        if u.op == "output":
            return None, nodes, f"{describe(cur)} is a graph output"
        if u in lins and u.args[0] is cur:
            if stage != 2:
                return None, nodes, f"{describe(u)} reads the attention output before the heads are merged"
            return lins[u], nodes, None
        if _is_call(u, TRANSPARENT) or _noop_reshape(u) or (stage == 2 and _keeps_last_dim(u)):
            pass
        elif stage == 0 and _is_head_swap(u):
            stage = 1
        elif stage == 1 and _is_call(u, RESHAPES):
            a, b = _shape(cur), _shape(u)
            if not (a and b and len(a) == len(b) + 1 and a[:-2] == b[:-1] and a[-2] * a[-1] == b[-1]):
                return None, nodes, f"{describe(u)} is not a head merge [..., H, D] → [..., H·D]"
            stage = 2
        else:
            return None, nodes, f"{describe(u)} is not modelled after the attention"
        nodes.append(u)
        cur = u


def _users_inside(tr: _Trace, entry: torch.fx.Node) -> str | None:
    """Every node between the projection and the attention is read only inside the recognized chain
    (the linear and the views above a split may also feed the split's other parts)."""
    inside = set(tr.nodes) | {entry}
    for n in tr.nodes + ([tr.linear.node] if tr.linear else []):
        for u in n.users:
            if u in inside or _is_call(u, IGNORED_USERS):
                continue
            if _is_call(n, _SPLITS) and u.op == "call_function" and u.target is operator.getitem:
                continue                                      # another part of a fused projection
            if _is_call(u, {aten.slice.Tensor}) and _slices_elsewhere(u, tr):
                continue
            return f"{describe(n)} is also read by {describe(u)}, outside the attention"
    return None


def _slices_elsewhere(u: torch.fx.Node, tr: _Trace) -> bool:
    size = _shape(u.args[0])
    rng = _slice_range(u, size[-1]) if size else None
    return rng is not None and (rng[1] <= tr.offset or rng[0] >= tr.offset + tr.width)


def attentions(gm: torch.fx.GraphModule) -> list[Attention]:
    """Every attention with its value-output and query-key groups (or the reasons they are refused)."""
    lins = {li.node: li for li in linears(gm)}
    shared = {t for sp in shared_parameters(gm) for t in sp.targets}
    out = []
    for sdpa in gm.graph.nodes:
        if not _is_call(sdpa, _SDPA):
            continue
        q, k, v = sdpa.args[:3]
        qs, ks, vs = _shape(q), _shape(k), _shape(v)
        if not (qs and ks and vs and len(qs) == len(ks) == len(vs) == 4):
            out.append(Attention(sdpa, 0, 0, None, None, [f"{describe(sdpa)}: operands are not 4-D [B, H, S, D]"]))
            continue
        att = Attention(sdpa, qs[1], 0, None, None)
        gqa = bool(sdpa.kwargs.get("enable_gqa", False))
        tq, tk = _trace_in(q, lins, rope=True), _trace_in(k, lins, rope=True)
        tv = _trace_in(v, lins, rope=False)
        o, _, oreason = _trace_out(sdpa, lins)
        for tr in (tq, tk, tv):
            if tr.reason is None:
                tr.reason = _users_inside(tr, sdpa)
        # GQA: KV heads at the projection, query heads per KV head
        for tr in (tk, tv):
            if tr.reason is None and tr.heads:
                at_sdpa = tr.heads * tr.rep
                extra = qs[1] // at_sdpa if gqa and at_sdpa and qs[1] % at_sdpa == 0 else 1
                if at_sdpa * extra != qs[1]:
                    tr.reason = f"{tr.heads} KV heads do not divide the {qs[1]} query heads of {describe(sdpa)}"
                tr.rep *= extra
        att.kv_heads = tv.heads or tk.heads
        att.qk = _qk_group(sdpa, tq, tk, shared)
        att.vo = _vo_group(sdpa, tv, o, oreason, qs[1], shared)
        out.append(att)
    return out


def _rows(li: LinearInfo, index: torch.Tensor) -> list[Member]:
    out = [Member(li.weight, 0, index, "rows", li)]
    if li.bias:
        out.append(Member(li.bias, 0, index, "rows", li))
    return out


def _copies(offset: int, kv_heads: int, rep: int, d: int) -> torch.Tensor:
    """index[r, g·d + j] = offset + (g·rep + r)·d + j: query head g·rep + r uses KV head g."""
    g = torch.arange(kv_heads)[None, :, None]
    r = torch.arange(rep)[:, None, None]
    j = torch.arange(d)[None, None, :]
    return (offset + (g * rep + r) * d + j).reshape(rep, kv_heads * d)


def _name(li: LinearInfo | None, node: torch.fx.Node) -> str:
    return li.path if li is not None else (module_path(node) or node.name)


def _qk_group(sdpa, tq: _Trace, tk: _Trace, shared: set) -> CoupledGroup:
    grp = CoupledGroup("query-key", _name(tk.linear, sdpa), tk.width, tk.head_dim, attention=sdpa)
    for who, tr in (("Q", tq), ("K", tk)):
        if tr.reason:
            grp.reasons.append(f"{who}: {tr.reason}")
    if grp.reasons:
        return grp
    if tq.head_dim != tk.head_dim:
        grp.reasons.append(f"Q and K head dims differ ({tq.head_dim} vs {tk.head_dim})")
        return grp
    if tq.rep != 1 or tq.heads != tk.heads * tk.rep:
        grp.reasons.append(f"{tq.heads} query heads do not match {tk.heads} key heads × {tk.rep}")
        return grp
    if bool(tq.rope) != bool(tk.rope):
        grp.reasons.append("RoPE is applied to only one of Q and K")
        return grp
    kv, d = tk.heads, tk.head_dim
    grp.members += _rows(tk.linear, tk.offset + torch.arange(kv * d)[None, :])
    grp.members += _rows(tq.linear, _copies(tq.offset, kv, tk.rep, d))
    grp.rope = tq.rope + tk.rope
    _refuse_shared(grp, shared)
    return grp


def _vo_group(sdpa, tv: _Trace, o: LinearInfo | None, oreason: str | None, q_heads: int, shared: set) -> CoupledGroup:
    grp = CoupledGroup("value-output", _name(tv.linear, sdpa), tv.width, tv.head_dim, attention=sdpa)
    if tv.reason:
        grp.reasons.append(f"V: {tv.reason}")
    if oreason:
        grp.reasons.append(f"output: {oreason}")
    if grp.reasons:
        return grp
    kv, d = tv.heads, tv.head_dim
    if o.in_features != q_heads * d:
        grp.reasons.append(f"{o.path} reads {o.in_features} channels, the attention makes {q_heads}×{d}")
        return grp
    grp.members += _rows(tv.linear, tv.offset + torch.arange(kv * d)[None, :])
    grp.members.append(Member(o.weight, 1, _copies(0, kv, tv.rep, d), "columns", o))
    _refuse_shared(grp, shared)
    return grp


def _refuse_shared(grp: CoupledGroup, shared: set) -> None:
    for t in sorted({mb.target for mb in grp.members} & shared):
        grp.reasons.append(f"parameter {t} is shared with another use (tied); permuting it would change that use")


# --------------------------------------------------------------------------- all groups


def ffn_groups(gm: torch.fx.GraphModule) -> list[CoupledGroup]:
    """:func:`~fxopt.ir.structure.channel_groups` as :class:`CoupledGroup` (kind "ffn"). Groups whose
    channels reach a residual add, a graph output or an op not modelled keep those escapes as reasons."""
    shared = {t for sp in shared_parameters(gm) for t in sp.targets}
    out = []
    for cg in channel_groups(gm):
        ar = torch.arange(cg.channels)[None, :]
        grp = CoupledGroup("ffn", cg.producers[0].path, cg.channels, cg.channels)
        grp.members += [Member(li.weight, 0, ar, "rows", li) for li in cg.producers]
        bias_of = {li.bias: li for li in cg.producers if li.bias}
        for target, dim in cg.params:
            li = bias_of.get(target)
            grp.members.append(Member(target, dim, ar, "rows" if li else "param", li))
        grp.members += [Member(li.weight, 1, ar, "columns", li) for li in cg.consumers]
        grp.reasons += cg.escapes
        if not cg.consumers and not cg.escapes:
            grp.reasons.append("no linear reads these channels")
        _refuse_shared(grp, shared)
        out.append(grp)
    return out


def coupled_groups(gm: torch.fx.GraphModule) -> list[CoupledGroup]:
    """Every coupled group of the graph: FFN groups, then per attention its value-output and
    query-key groups. Refused groups are included, with their reasons.

    FFN groups of linears that an attention group already covers (the projections, whose outputs
    escape into a head split) are left out: the attention groups describe them."""
    att = [g for a in attentions(gm) for g in (a.vo, a.qk) if g is not None]
    covered = {mb.linear.node for g in att for mb in g.members if mb.role == "rows" and mb.linear is not None}
    ffn = [g for g in ffn_groups(gm) if not any(li.node in covered for li in g.producers)]
    return ffn + att


# --------------------------------------------------------------------------- applying a permutation


def apply_permutation(gm: torch.fx.GraphModule, group: CoupledGroup, perm: torch.Tensor, *,
                      head_moves: bool = False) -> None:
    """Apply ``perm`` (new channel ``c`` = old channel ``perm[c]``) to every member of ``group``.

    Parameters are replaced with new tensors (:func:`~fxopt.ir.graph.set_attr`); the caller's
    tensors are never written. For RoPE groups the cos/sin tables are re-indexed for this
    attention's products only (one ``index_select`` each). Raises ValueError for a refused group or
    a permutation the group does not allow."""
    if group.reasons:
        raise ValueError(f"{group.kind} group {group.name} cannot be permuted: {'; '.join(group.reasons)}")
    perm = torch.as_tensor(perm, dtype=torch.long)
    p = group.check_permutation(perm, head_moves=head_moves)
    by_target: dict[str, list[Member]] = {}
    for mb in group.members:
        by_target.setdefault(mb.target, []).append(mb)
    for target, mbs in by_target.items():
        old = get_attr(gm, target).detach()
        new = old.clone()
        for mb in mbs:
            for r in range(mb.index.shape[0]):
                idx = mb.index[r]
                new.index_copy_(mb.dim, idx, old.index_select(mb.dim, idx[perm]))
        set_attr(gm, target, new)
    if p is not None and not torch.equal(p, torch.arange(group.head_dim)):
        _reindex_tables(gm, group, p)


def _reindex_tables(gm: torch.fx.GraphModule, group: CoupledGroup, p: torch.Tensor) -> None:
    """Feed this attention's RoPE products ``table[..., p]`` instead of ``table``. The group then
    refers to the new tables, so a later permutation composes with this one."""
    by_table: dict[torch.fx.Node, list[torch.fx.Node]] = {}
    for mul, table in group.rope:
        by_table.setdefault(table, []).append(mul)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for table, muls in by_table.items():
        first = min(muls, key=order.__getitem__)
        idx = add_constant(gm, f"{group.name}.rope_permutation", p.clone(), before=first)
        with gm.graph.inserting_before(first):
            sel = gm.graph.call_function(aten.index_select.default, (table, -1, idx))
        if "val" in table.meta:
            sel.meta["val"] = table.meta["val"]               # same shape and dtype
        SOURCE_PATH.set(sel, module_path(first) or first.name)
        for mul in muls:
            mul.replace_input_with(table, sel)
        group.rope = [(mul, sel if t is table else t) for mul, t in group.rope]


def permute_heads(gm: torch.fx.GraphModule, att: Attention, sigma: torch.Tensor) -> None:
    """Whole-head moves: KV-head slot ``g`` takes old KV head ``sigma[g]`` (with its query heads) in
    Q, K and V rows and O's column blocks. Exact: heads are computed independently."""
    if att.qk is None or att.vo is None or att.qk.reasons or att.vo.reasons:
        why = "; ".join((att.qk.reasons if att.qk else []) + (att.vo.reasons if att.vo else []) + att.reasons)
        raise ValueError(f"{describe(att.node)}: whole heads cannot move: {why}")
    sigma = torch.as_tensor(sigma, dtype=torch.long)
    for grp in (att.qk, att.vo):
        d = grp.head_dim
        perm = (sigma[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        apply_permutation(gm, grp, perm, head_moves=True)
