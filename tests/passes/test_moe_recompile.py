"""moe-profile, moe-recompile (plans, uniform, BPR, the runtime guard) and moe-prune-experts."""
import pytest
import torch

import fxopt
from fxopt import models
from fxopt.nn import MoELayer
from fxopt.passes import PassFailedError, format_pipeline, parse_pipeline
from fxopt.passes.moe_recompile import MoERuntime, moe_blocks
from tests.helpers import max_abs

D, E = 16, 4


class TwoDomainMoE(torch.nn.Module):
    """Two top-1 MoE layers whose routers send domain A (x ≈ +2·u) to experts 0/1 and domain B
    (x ≈ −2·u) to experts 2/3; the sign of the second coordinate splits each pair."""

    def __init__(self, norm_topk=True):
        super().__init__()
        self.l1 = MoELayer(D, 32, E, top_k=1, norm_topk=norm_topk)
        self.l2 = MoELayer(D, 32, E, top_k=1, norm_topk=norm_topk)
        with torch.no_grad():
            for lay in (self.l1, self.l2):
                w = torch.zeros(E, D)
                w[0, 0], w[0, 1] = 3.0, 1.0
                w[1, 0], w[1, 1] = 3.0, -1.0
                w[2, 0], w[2, 1] = -3.0, 1.0
                w[3, 0], w[3, 1] = -3.0, -1.0
                lay.router.weight.copy_(w)
                lay.w_out.mul_(0.1)

    def forward(self, x):
        x = x + self.l1(x)
        return x + self.l2(x)


def batch(domain: str, seed: int, tokens: int = 64) -> torch.Tensor:
    """Half the tokens lean to each expert of the domain's pair, in a random order: each hot expert
    gets exactly T/2 tokens, so the guard's decisions do not depend on sampling noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, tokens, D, generator=g) * 0.3
    x[..., 0] += 2.0 if domain == "A" else -2.0
    sign = torch.ones(tokens)
    sign[: tokens // 2] = -1
    x[0, :, 1] = sign[torch.randperm(tokens, generator=g)] * (0.5 + torch.rand(tokens, generator=g))
    return x


@pytest.fixture(scope="module")
def two_domain():
    torch.manual_seed(0)
    return TwoDomainMoE().eval()


def test_pipeline_text_round_trips():
    for text in ["moe-recompile", "moe-recompile{capacity=uniform,factor=2.0}", "moe-recompile{routing=bpr}",
                 "moe-recompile{slack=0.5,sigmas=2.0}", "moe-prune-experts{min_share=0.05}", "moe-profile"]:
        assert format_pipeline(parse_pipeline(text)) == text
    with pytest.raises(Exception, match="capacity"):
        parse_pipeline("moe-recompile{capacity=sometimes}")


def test_profile_counts_by_hand(two_domain):
    calib = [batch("A", s) for s in range(3)]
    res = fxopt.optimize(two_domain, "moe-profile", calib[0], calibration=[(c,) for c in calib])
    rec = res.record("moe-profile")
    assert not rec.modified and rec.stats["blocks"] == 2
    from fxopt.ir.meta import MOE
    prof = next(MOE.get(n) for n in res.module.graph.nodes if MOE.get(n) is not None and MOE.get(n).name == "l1").profile
    with torch.no_grad():
        for b, x in enumerate(calib):
            ids = two_domain.l1.router(x.reshape(-1, D)).argmax(-1)
            assert prof.loads[b].tolist() == torch.bincount(ids, minlength=E).tolist()
    assert prof.tokens == [64] * 3 and prof.loads[:, 2:].sum() == 0
    assert abs(float(prof.mean_share.sum()) - 1.0) < 1e-9


def test_plan_needs_calibration(two_domain):
    with pytest.raises(PassFailedError, match="calibration"):
        fxopt.optimize(two_domain, "moe-recompile", batch("A", 0))


def test_exact_when_capacity_suffices(two_domain):
    x = batch("A", 0)
    with torch.no_grad():
        ref = two_domain(x)
    for text in ["moe-recompile{capacity=uniform,factor=4.0}", "moe-recompile{capacity=dropless}",
                 "moe-recompile{capacity=uniform,factor=4.0,routing=bpr}"]:
        res = fxopt.optimize(two_domain, text, x)
        assert len(moe_blocks(res.module)) == 2
        assert max_abs(res.module(x), ref) < 1e-5, text
    res = fxopt.optimize(two_domain, "moe-recompile", x, calibration=[(x,), (batch("A", 1),)])
    assert res.record("moe-recompile").stats["l1.calib_dropped"] == 0
    assert max_abs(res.module(x), ref) < 1e-5          # the plan covers the example's load
    report = res.report()
    assert "MoE blocks:" in report and "l1: 4 experts" in report and "capacity [" in report


def test_plan_pads_less_than_uniform_and_drops_less(two_domain):
    calib = [(batch("A", s),) for s in range(4)]
    stream = [batch("A", 100 + s) for s in range(6)]
    reports = {}
    for text in ["moe-recompile", "moe-recompile{capacity=uniform,factor=1.25}"]:
        res = fxopt.optimize(two_domain, text, calib[0], calibration=calib)
        rt = MoERuntime(res.module, max_drop=1.0, max_waste=1.0)     # no re-planning: the plans as made
        reports[text] = rt.run(stream, reference=two_domain)
    plan, uni = reports["moe-recompile"], reports["moe-recompile{capacity=uniform,factor=1.25}"]
    # uniform C = 1.25 · 64 / 4 = 20 slots per expert: the two hot experts (≈ 32 tokens each) overflow
    assert uni.dropped > 0 and plan.dropped == 0
    assert plan.padded_flops < uni.padded_flops
    assert plan.useful_flops > uni.useful_flops
    assert plan.rel_error < 1e-6 < uni.rel_error                # nothing dropped: the dropless outputs


def test_runtime_steady_never_recompiles_shift_once_and_back_is_cached(two_domain):
    calib = [(batch("A", s),) for s in range(4)]
    res = fxopt.optimize(two_domain, "moe-recompile", calib[0], calibration=calib)
    built = []
    rt = res.moe_runtime(compile_fn=lambda gm: built.append(gm) or gm)
    rt.run([batch("A", 200 + s) for s in range(8)])
    assert rt.report.recompilations == 0 and rt.report.dropped == 0 and rt.report.events == []
    rt.run([batch("B", 300 + s) for s in range(8)])
    assert rt.report.recompilations == 1
    assert {e.batch for e in rt.report.events} == {8}           # both blocks re-planned on the first B batch
    per_batch = [b["dropped"] for b in rt.report.per_batch]
    assert per_batch[8] > 0 and sum(per_batch) == per_batch[8]   # only the first B batch drops
    rt.run([batch("A", 400 + s) for s in range(4)])
    assert rt.report.recompilations == 1 and rt.report.cache_hits == 1   # A's variant is reused
    assert len(built) == 2 and rt.report.compiles == 2
    assert "re-planned 2×" in res.report() and "1 recompilations" in res.report()


def test_runtime_rerun_serves_the_overflowing_batch_again(two_domain):
    calib = [(batch("A", s),) for s in range(4)]
    res = fxopt.optimize(two_domain, "moe-recompile", calib[0], calibration=calib)
    rt = MoERuntime(res.module, rerun=True)
    rt.run([batch("B", 500 + s) for s in range(3)])
    assert rt.report.recompilations == 1 and rt.report.dropped == 0
    with torch.no_grad():
        assert max_abs(rt(batch("B", 510)), two_domain(batch("B", 510))) < 1e-5


def test_prune_experts_a_task_never_uses(two_domain):
    calib = [(batch("A", s),) for s in range(4)]
    x = batch("A", 0)
    res = fxopt.optimize(two_domain, "moe-prune-experts{min_share=0.01},moe-recompile{capacity=dropless}", x,
                         calibration=calib)
    rec = res.record("moe-prune-experts")
    per_expert = (2 * 32 * D + D * 32) * 4                   # bytes of one gated expert's w_in + w_out
    assert rec.modified and rec.stats["experts_removed"] == 4 and rec.stats["bytes_saved"] == 4 * per_expert
    assert res.records[0].param_bytes - rec.param_bytes == 4 * per_expert
    assert rec.stats["max_abs_error"] < 1e-6                 # top-1 renormalized: never-used experts change nothing
    blocks = moe_blocks(res.module)
    assert [b.experts for b in blocks] == [[0, 1], [0, 1]]
    with torch.no_grad():
        assert max_abs(res.module(batch("A", 7)), two_domain(batch("A", 7))) < 1e-5
    assert "2/4 experts kept" in res.report()
    again = fxopt.optimize(res.module, "moe-prune-experts{min_share=0.01}", x, calibration=calib)
    assert not again.record("moe-prune-experts").modified


def test_prune_reports_error_when_tokens_must_move():
    torch.manual_seed(0)
    m = TwoDomainMoE(norm_topk=False).eval()
    mixed = [(torch.cat([batch("A", s), batch("B", s + 50)[:, :4]], 1),) for s in range(3)]
    res = fxopt.optimize(m, "moe-prune-experts{min_share=0.1}", mixed[0][0], calibration=mixed)
    st = res.record("moe-prune-experts").stats
    assert st["experts_removed"] == 4 and st["max_abs_error"] > 0 and 0 < st["rel_error"] < 1


def test_hf_mixtral_plan_and_not_applicable():
    lm = models.hf_tiny("mixtral-tiny", layers=2)
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(1, 128, (2, 16), generator=g),
              "attention_mask": torch.ones(2, 16, dtype=torch.long)} for _ in range(3)]
    res = fxopt.optimize(lm.model, "moe-recompile{routing=bpr}", lm.example_inputs, calibration=calib)
    rec = res.record("moe-recompile")
    assert rec.modified and rec.stats["blocks"] == 2 and "slots at T=32" in rec.notes[0]
    assert [b.routing for b in moe_blocks(res.module)] == ["bpr", "bpr"]
    roomy = fxopt.optimize(lm.model, "moe-recompile{capacity=uniform,factor=2.0}", lm.example_inputs)
    with torch.no_grad():                                        # c = E/k = 2: cap_e = T, nothing dropped
        ref = lm.model(**lm.example_inputs).logits
    assert max_abs(roomy.module(**lm.example_inputs).logits, ref) < 1e-5
    again = fxopt.optimize(res.module, "moe-recompile{routing=bpr}", lm.example_inputs, calibration=calib)
    assert not again.record("moe-recompile").modified           # fixed point
    plain = fxopt.optimize(torch.nn.Linear(8, 8), "moe-recompile", torch.randn(2, 8))
    assert plain.records[-1].status == "not-applicable" and "no MoE block" in plain.records[-1].notes[0]


def test_bad_options_and_nothing_to_profile(two_domain):
    x = batch("A", 0)
    with pytest.raises(PassFailedError, match="slack and sigmas must be"):
        fxopt.optimize(two_domain, "moe-recompile{capacity=uniform,slack=-0.1}", x)
    with pytest.raises(PassFailedError, match="min_share must be"):
        fxopt.optimize(two_domain, "moe-prune-experts{min_share=1.5}", x, calibration=[(x,)])
    with pytest.raises(PassFailedError, match="calibration"):
        fxopt.optimize(two_domain, "moe-profile", x)
    res = fxopt.optimize(torch.nn.Linear(D, D), "moe-profile", x, calibration=[(x,)])
    assert res.records[-1].status == "not-applicable"
    with pytest.raises(ValueError, match="moe-recompile"):
        MoERuntime(res.module)


def test_runtime_follows_the_token_count_of_a_dynamic_graph(two_domain):
    calib = [(batch("A", s, tokens=48 + 16 * s),) for s in range(4)]      # other shapes: captured dynamic
    res = fxopt.optimize(two_domain, "moe-recompile", calib[0], calibration=calib)
    rt = res.moe_runtime()
    rep = rt.run([batch("A", 600 + s, tokens=t) for s, t in enumerate([64, 128, 32, 96])])
    assert rep.recompilations == 0 and rep.dropped == 0 and rep.tokens == 320


class NoisyRouterMoE(torch.nn.Module):
    """One top-1 MoE layer whose router sends x ≈ 2·e_j (plus noise) to expert j: a batch's loads
    are a multinomial draw of the workload's expert probabilities — realistic per-batch noise."""

    def __init__(self):
        super().__init__()
        self.moe = MoELayer(D, 32, E, top_k=1)
        with torch.no_grad():
            w = torch.zeros(E, D)
            w[:, :E] = 4 * torch.eye(E)
            self.moe.router.weight.copy_(w)
            self.moe.w_out.mul_(0.1)

    def forward(self, x):
        return x + self.moe(x)


WORKLOAD_A, WORKLOAD_B = [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]


def noisy_batch(probs, seed: int, tokens: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    experts = torch.multinomial(torch.tensor(probs), tokens, replacement=True, generator=g)
    x = torch.randn(1, tokens, D, generator=g) * 0.3
    x[0, torch.arange(tokens), experts] += 2.0
    return x


def test_guard_ignores_per_batch_noise_and_recompiles_once_on_a_shift():
    torch.manual_seed(0)
    m = NoisyRouterMoE().eval()
    calib = [(noisy_batch(WORKLOAD_A, s),) for s in range(4)]
    res = fxopt.optimize(m, "moe-recompile", calib[0][0], calibration=calib)
    rt = res.moe_runtime()
    rt.run([noisy_batch(WORKLOAD_A, 100 + s) for s in range(24)])
    shares = [b["dropped"] / b["assignments"] for b in rt.report.per_batch]
    assert max(shares) > 0.01          # a single-batch 1 % rule would have re-planned on noise here
    assert rt.report.recompilations == 0 and rt.report.events == []
    assert sum(b["dropped"] for b in rt.report.per_batch) < 0.01 * rt.report.assignments
    rt.run([noisy_batch(WORKLOAD_B, 500 + s) for s in range(24)])
    rep = rt.report
    assert rep.recompilations == 1 and rep.plan_switches == 1 and rep.block_replans == 1
    (ev,) = rep.events
    assert ev.batch == 24 and ev.reason.startswith("shift:")     # the first B batch
    after = [b["dropped"] for b in rep.per_batch[25:]]
    assert sum(after) < 0.01 * 128 * len(after)                 # the plan made from one batch holds
    assert "1 recompilations (variants built after the first), 1 plan switches (0 cache hits), 1 block re-plans" \
        in str(rep)


def test_replan_covers_the_window_max_load():
    from fxopt.ir import moeops
    from fxopt.passes.moe_recompile import plan_from_loads

    torch.manual_seed(0)
    m = NoisyRouterMoE().eval()
    x = noisy_batch(WORKLOAD_A, 0)
    res = fxopt.optimize(m, "moe-recompile{capacity=uniform}", x)
    rt = MoERuntime(res.module, slack=0.0)
    name = next(iter(rt.blocks))
    loads = [[20, 20, 12, 12], [20, 20, 12, 12], [20, 20, 12, 12], [44, 4, 8, 8]]   # T = 64, one spike
    recs = [moeops.LoadRecord(name, 64, 1, lo, [16] * 4, [min(16, n) for n in lo], 1) for lo in loads]
    bare = plan_from_loads(torch.tensor(loads), torch.tensor([64] * 4), 0.0)
    assert moeops.capacities(64, 1, 4, bare)[0] < 44             # mean + 1 σ does not cover the spike
    plan = rt._replan(name, recs)
    caps = moeops.capacities(64, 1, 4, list(plan))
    assert all(c >= max(lo[e] for lo in loads) for e, c in enumerate(caps))
    assert [max(a, b) for a, b in zip(bare, plan)] == list(plan)   # only raised, never lowered
