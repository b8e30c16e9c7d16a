"""fxopt.nn.MoELayer: dropless numerics vs a per-token loop, capacity, token dropping, BPR."""
import pytest
import torch

from fxopt.ir import moeops
from fxopt.nn import MoELayer
from tests.helpers import max_abs


def _loop(m: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The MoE math written per token and per choice."""
    h = x.reshape(-1, m.d_model)
    p = torch.softmax(m.router(h), -1)
    w, i = p.topk(m.top_k, -1)
    if m.norm_topk:
        w = w / w.sum(-1, keepdim=True)
    act = moeops.ACTIVATIONS[m.activation]
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for j in range(m.top_k):
            e = int(i[t, j])
            u = m.w_in[e] @ h[t]
            u = act(u[: m.d_ff]) * u[m.d_ff:] if m.gated else act(u)
            out[t] += w[t, j] * (m.w_out[e] @ u)
    return out.reshape(x.shape)


@pytest.mark.parametrize("kw", [dict(top_k=2), dict(top_k=1), dict(top_k=2, gated=False, activation="gelu",
                                                                      norm_topk=False)])
def test_dropless_matches_per_token_loop(kw):
    torch.manual_seed(0)
    m, x = MoELayer(16, 24, 4, **kw).eval(), torch.randn(3, 5, 16)
    with torch.no_grad():
        assert max_abs(m(x), _loop(m, x)) < 1e-5


def test_capacity_covering_every_load_equals_dropless():
    torch.manual_seed(1)
    m, x = MoELayer(16, 24, 4, top_k=2).eval(), torch.randn(2, 8, 16)
    with torch.no_grad():
        ref = m(x)
        m.capacity_factor = 4 / 2          # c·T·k/E = T: no expert can overflow
        with moeops.LoadRecorder() as rec:
            got = m(x)
    assert max_abs(got, ref) < 1e-6
    assert rec.records[0].dropped == 0 and rec.records[0].caps == [16] * 4


def _one_hot_router(scores: torch.Tensor) -> tuple[MoELayer, torch.Tensor]:
    """Top-1 layer whose router sends every token to expert 0, with router probability rising with
    ``scores`` (x[t] = scores[t]·e_0, router row 0 = e_0, the other rows 0)."""
    m = MoELayer(4, 8, 4, top_k=1, capacity_factor=1.0).eval()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = 1.0
    x = torch.zeros(len(scores), 4)
    x[:, 0] = scores
    return m, x


def test_dropped_tokens_hand_computed():
    # T = 8 tokens, all to expert 0; every cap = ⌈1.0 · 8 · 1 / 4⌉ = 2 → 6 dropped, 6 of the 8 slots padding
    m, x = _one_hot_router(torch.linspace(1, 2, 8))
    with torch.no_grad(), moeops.LoadRecorder() as rec:
        y = m(x)
    r = rec.records[0]
    assert r.loads == [8, 0, 0, 0] and r.caps == [2, 2, 2, 2] and r.kept == [2, 0, 0, 0]
    assert r.dropped == 6 and r.slots == 8 and r.padding == 6
    kept_rows = (y.abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert kept_rows == [0, 1]                         # vanilla: positional order
    m.capacity_factor = None
    with torch.no_grad():
        assert max_abs(y[:2], m(x)[:2]) < 1e-6          # kept tokens are computed exactly


def test_bpr_keeps_the_highest_scoring_tokens():
    scores = torch.tensor([1.0, 5.0, 2.0, 4.0, 0.5, 3.0, 6.0, 1.5])
    m, x = _one_hot_router(scores)
    m.routing = "bpr"
    with torch.no_grad():
        y = m(x)
    kept_rows = sorted((y.abs().sum(-1) > 0).nonzero().flatten().tolist())
    assert kept_rows == [1, 6]                         # the two largest router probabilities
    m.routing = "vanilla"
    with torch.no_grad():
        assert sorted((m(x).abs().sum(-1) > 0).nonzero().flatten().tolist()) == [0, 1]


def test_bpr_lower_error_than_vanilla_when_capacity_is_short():
    # top-1 (Switch-style): a dropped token loses p_max · y, and BPR drops the smallest p_max.
    # (top-2: test_bpr_orders_each_round_by_its_own_weight; docs/passes/moe.md has both on random weights.)
    torch.manual_seed(3)
    errs = {}
    m = MoELayer(32, 64, 8, top_k=1, norm_topk=False).eval()
    x = torch.randn(4, 32, 32) * 2
    with torch.no_grad():
        ref = m(x)
        for routing in ("vanilla", "bpr"):
            m.capacity_factor, m.routing = 0.75, routing
            errs[routing] = float((m(x) - ref).norm() / ref.norm())
    assert errs["bpr"] < errs["vanilla"], errs


def test_per_expert_capacity_and_bad_arguments():
    torch.manual_seed(0)
    m = MoELayer(8, 8, 4, top_k=2, capacity_factor=[2.0, 0.5, 1.0, 1.0]).eval()
    with torch.no_grad(), moeops.LoadRecorder() as rec:
        m(torch.randn(16, 8))
    assert rec.records[0].caps == [16, 4, 8, 8]        # ⌈c_e · 16 · 2 / 4⌉, at most T
    with pytest.raises(ValueError, match="top_k"):
        MoELayer(8, 8, 2, top_k=3)
    with pytest.raises(ValueError, match="routing"):
        MoELayer(8, 8, 2, routing="random")
    with pytest.raises(ValueError, match="capacity factors"):
        MoELayer(8, 8, 4, capacity_factor=[1.0, 1.0])(torch.randn(2, 8))


def test_routing_is_a_small_share_of_the_op():
    r = moeops.routing_cost_share(128, 512, 8, 2, 128, repeats=3)
    assert set(r) == {"router_ms", "routing_ms", "experts_ms", "hash_ms", "share"}
    assert 0 < r["share"] < 1 and r["experts_ms"] > r["router_ms"]


def test_upcycled_from_a_dense_mlp_is_the_mlp_without_noise():
    torch.manual_seed(0)
    gate, up = torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False)
    down = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        dense = down(torch.nn.functional.silu(gate(x)) * up(x))
        m = MoELayer.from_mlp(gate.weight, up.weight, down.weight, 4, top_k=2, router_weight=torch.randn(4, 16))
        assert max_abs(m(x), dense) < 1e-5
        noisy = MoELayer.from_mlp(gate.weight, up.weight, down.weight, 4, noise=0.05,
                                  generator=torch.Generator().manual_seed(0))
        assert 0 < max_abs(noisy(x), dense) < 0.1 * float(dense.abs().max())
        assert not torch.equal(noisy.w_in[0], noisy.w_in[1])


def test_dropless_graph_never_copies_weights_per_token():
    # the dropless forward is a dense one-hot combine: no intermediate of T·k·F'·D (expert weights
    # gathered per (token, choice)); the largest values are the weights themselves and E·T·F'
    from fxopt.ir import capture
    from fxopt.ir.moe import find_moe_blocks

    torch.manual_seed(0)
    d, f, e, k, t = 32, 64, 4, 2, 96
    m, x = MoELayer(d, f, e, top_k=k).eval(), torch.randn(t, d)

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = m

        def forward(self, x):
            return x + self.moe(x)

    gm = capture(Residual().eval(), (x,))
    sizes = [n.meta["val"].numel() for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert max(sizes) == max(e * 2 * f * d, e * t * 2 * f)          # w_in [E, 2F, D] / u [E, 2F, T]
    assert max(sizes) * 4 < t * k * 2 * f * d                        # the old per-assignment gather: 16× more
    (match,), notes = find_moe_blocks(gm, (x,))
    assert notes == [] and match.block.top_k == k                    # still recognized (and verified)
    with torch.no_grad():
        assert max_abs(gm(x), x + _loop(m, x)) < 1e-5


def test_dropless_memory_does_not_grow_with_weights_times_tokens():
    # allocations of one eager dropless forward at 16 and 256 tokens: the extra memory per token is
    # O(E·(D + F')) floats, far below the k·F'·D per token of copying expert weights per assignment
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    d, f, e, k = 64, 128, 4, 2
    m = MoELayer(d, f, e, top_k=k).eval()

    def peak_bytes(t: int) -> int:
        x = torch.randn(t, d)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            m(x)
        return max(ev.cpu_memory_usage for ev in prof.key_averages())

    small, large = peak_bytes(16), peak_bytes(256)
    per_token = (large - small) / (256 - 16)
    assert per_token < 4 * 4 * e * (d + 2 * f)                       # a few [E, ·, T] tensors
    assert per_token * 8 < 4 * k * 2 * f * d                        # vs. one weight copy per assignment


def test_bpr_orders_each_round_by_its_own_weight():
    # 4 tokens, top-2 of 5 experts, renormalized: first choices to experts 0..3 (one each), every
    # second choice to expert 4, which has 2 slots. Top-1 probabilities (0.6, 0.9, 0.55, 0.8) →
    # second-choice weights (0.4, 0.1, 0.45, 0.2).
    p1 = torch.tensor([0.6, 0.9, 0.55, 0.8])
    probs = torch.full((4, 5), 1e-6)
    probs[torch.arange(4), torch.arange(4)] = p1
    probs[:, 4] = 1 - p1
    w, ids, prio = moeops.route(probs.log(), 2, True)
    caps = [2] * 5
    kept = {}
    for name, order, pr in [("vanilla", "vanilla", prio), ("top-1 priority", "bpr", w[:, 0]),
                            ("per-round bpr", "bpr", prio)]:
        _, slot_w, loads, k_e = moeops.assign(ids, w, pr, caps, order)
        assert loads.tolist() == [1, 1, 1, 1, 4] and k_e.tolist() == [1, 1, 1, 1, 2]
        kept[name] = float(slot_w.sum())
    # kept second-choice weight: per-round keeps tokens 2, 0 (0.45 + 0.4); positional 0, 1 (0.4 + 0.1);
    # top-1 priority the most confident 1, 3 (0.1 + 0.2) — the old BPR, worse than positional
    first = float(p1.sum())                                         # every first choice is served
    assert abs(kept["per-round bpr"] - (first + 0.85)) < 1e-4
    assert abs(kept["vanilla"] - (first + 0.5)) < 1e-4
    assert abs(kept["top-1 priority"] - (first + 0.3)) < 1e-4
    # the layer: identical experts, so the output error is the dropped weight times f(x)
    m = MoELayer(4, 8, 5, top_k=2, capacity_factor=1.25).eval()
    with torch.no_grad():
        m.router.weight.copy_(probs.log().t())                       # x_t = e_t → logits_t = log p_t
        m.w_in.copy_(m.w_in[:1].expand_as(m.w_in))
        m.w_out.copy_(m.w_out[:1].expand_as(m.w_out))
        x = torch.eye(4)
        m.capacity_factor = None
        ref = m(x)
        m.capacity_factor = 1.25
        err = {}
        for routing in ("vanilla", "bpr"):
            m.routing = routing
            err[routing] = float((m(x) - ref).norm() / ref.norm())
    assert err["bpr"] < err["vanilla"], err
