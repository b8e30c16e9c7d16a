"""Channel-permutation search for N:M sparsity (fxopt.passes._permutation_search)."""
from __future__ import annotations

import itertools

import pytest
import torch

from fxopt.passes._permutation_search import kept_magnitude, search_permutation, unstructured_bound


def _kept_loops(w_abs, n, m, order=None):
    """Reference N:M kept magnitude with plain Python loops."""
    rows = w_abs.tolist()
    cols = list(range(len(rows[0]))) if order is None else list(order)
    total = 0.0
    for row in rows:
        for g in range(0, len(cols), m):
            vals = sorted((row[c] for c in cols[g:g + m]), reverse=True)
            total += sum(vals[:n])
    return total


def _partitions(items, m):
    """All ways to split `items` into unordered groups of size m."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for comb in itertools.combinations(rest, m - 1):
        remaining = [c for c in rest if c not in comb]
        for tail in _partitions(remaining, m):
            yield [(first,) + comb] + tail


def _best_by_brute_force(w_abs, n, m):
    best = -1.0
    for parts in _partitions(list(range(w_abs.shape[1])), m):
        order = [c for grp in parts for c in grp]
        best = max(best, _kept_loops(w_abs, n, m, order))
    return best


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (1, 2), (2, 8)])
def test_kept_magnitude_matches_loops(n, m):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 16, generator=g)
    assert kept_magnitude(w.abs(), n, m) == pytest.approx(_kept_loops(w.abs(), n, m), rel=1e-9)
    perm = torch.randperm(16, generator=g)
    assert kept_magnitude(w.abs()[:, perm], n, m) == pytest.approx(_kept_loops(w.abs(), n, m, perm.tolist()),
                                                                   rel=1e-9)


def test_kept_magnitude_bad_shapes():
    with pytest.raises(ValueError):
        kept_magnitude(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError):
        kept_magnitude(torch.rand(2, 8), 5, 4)


@pytest.mark.parametrize("shape,seed", [((4, 8), 0), ((2, 8), 1), ((3, 12), 2), ((4, 12), 5)])
def test_search_reaches_brute_force_optimum_on_tiny(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    best = _best_by_brute_force(w.abs(), 2, 4)
    perm, info = search_permutation(w, 2, 4, escapes=200, seed=seed)
    assert sorted(perm.tolist()) == list(range(shape[1]))
    assert info["kept_after"] == pytest.approx(kept_magnitude(w.abs()[:, perm], 2, 4), rel=1e-9)
    assert info["kept_after"] <= best + 1e-9
    assert info["kept_after"] == pytest.approx(best, rel=1e-6)


def _seed1():
    torch.manual_seed(1)
    return torch.rand(64, 128)


def test_reference_figures_64x128():
    w = _seed1()
    total = float(w.abs().sum())
    plain = kept_magnitude(w.abs(), 2, 4)
    bound = unstructured_bound(w.abs(), 2, 4)
    # figures from the issue (total ~ 4083, plain 2:4 ~ 2852, bound ~ 3060), within 1 %
    assert total == pytest.approx(4083, rel=0.01)
    assert plain == pytest.approx(2852, rel=0.01)
    assert bound == pytest.approx(3060, rel=0.01)
    assert plain < bound < total


def test_gap_closed_64x128_and_valid():
    w = _seed1()
    perm, info = search_permutation(w, 2, 4, seed=0)          # default: deterministic, ~1 s
    assert sorted(perm.tolist()) == list(range(128))
    assert info["kept_after"] >= info["kept_before"]
    assert info["kept_after"] <= info["bound"] + 1e-6
    assert info["kept_after"] == pytest.approx(kept_magnitude(w.abs()[:, perm], 2, 4), rel=1e-9)
    # measured 48-50 % for this configuration; apex's best published figure is 47.6 %
    assert info["gap_closed"] >= 0.46, info


def test_deterministic_given_seed():
    torch.manual_seed(7)
    w = torch.randn(32, 64)
    p1, i1 = search_permutation(w, 2, 4, escapes=100, seed=11)
    p2, i2 = search_permutation(w, 2, 4, escapes=100, seed=11)
    assert torch.equal(p1, p2)
    assert i1["kept_after"] == i2["kept_after"] and i1["iterations"] == i2["iterations"]


def test_blocked_path_valid_and_not_worse():
    torch.manual_seed(2)
    w = torch.randn(16, 512)                                  # 128 groups > block_groups
    perm, info = search_permutation(w, 2, 4, escapes=5, block_groups=16, rounds=2, seed=3)
    assert sorted(perm.tolist()) == list(range(512))
    assert info["kept_after"] > info["kept_before"]
    assert info["kept_after"] == pytest.approx(kept_magnitude(w.abs()[:, perm], 2, 4), rel=1e-9)
    p2, _ = search_permutation(w, 2, 4, escapes=5, block_groups=16, rounds=2, seed=3)
    assert torch.equal(perm, p2)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8), (1, 2)])
def test_other_nm_patterns(n, m):
    torch.manual_seed(4)
    w = torch.randn(8, 32)
    perm, info = search_permutation(w, n, m, escapes=30)
    assert sorted(perm.tolist()) == list(range(32))
    assert info["kept_after"] >= info["kept_before"]
    assert info["kept_after"] == pytest.approx(kept_magnitude(w.abs()[:, perm], n, m), rel=1e-9)


def test_trivial_cases_return_identity():
    w = torch.randn(4, 8)
    for n, m in [(4, 4), (0, 4)]:
        perm, info = search_permutation(w, n, m)
        assert torch.equal(perm, torch.arange(8))
        assert info["gap_closed"] == 0.0
    perm, _ = search_permutation(torch.randn(4, 4), 2, 4)     # a single group
    assert torch.equal(perm, torch.arange(4))


# ------------------------------------------------------------------ assignment moves (large matrices)

def test_replacement_matrix_matches_direct_evaluation():
    """D[i, j] (group gs[i] with its slot holding column pos[j]) equals the kept magnitude computed
    directly on the modified group, so the L1-distance form of sum relu(x - t) is right."""
    import numpy as np

    from fxopt.passes._permutation_search import _group_stats, _replacement_matrix
    g = torch.Generator().manual_seed(5)
    x = torch.rand(7, 24, generator=g).numpy()
    n, m = 2, 4
    S, T, _ = _group_stats(x, n, m)
    gs = np.array([0, 2, 3, 5])
    slot = np.array([1, 0, 3, 2])
    pos = gs * m + slot
    D = _replacement_matrix(S, T, x, gs, slot, pos)
    for i, (grp, sl) in enumerate(zip(gs, slot)):
        for j, q in enumerate(pos):
            cols = list(range(grp * m, grp * m + m))
            cols[sl] = q
            assert D[i, j] == pytest.approx(_kept_loops(torch.from_numpy(x), n, m, cols), rel=1e-5)


def test_assignment_valid_not_worse_and_deterministic():
    torch.manual_seed(2)
    w = torch.randn(32, 512)                                  # 128 groups > block_groups: assignment
    perm, info = search_permutation(w, 2, 4, seed=3, rounds=10)
    assert info["method"] == "assignment"
    assert sorted(perm.tolist()) == list(range(512))
    assert info["kept_after"] > info["kept_before"]
    assert info["kept_after"] == pytest.approx(kept_magnitude(w.abs()[:, perm], 2, 4), rel=1e-9)
    p2, i2 = search_permutation(w, 2, 4, seed=3, rounds=10)
    assert torch.equal(perm, p2) and i2["iterations"] == info["iterations"]


def test_assignment_beats_stripe_swaps_on_medium_matrix():
    """Same work budget in rounds: the assignment neighbourhood closes more of the gap than greedy
    swaps on random 32-group stripe blocks (measured: 40.0 % vs 35.9 % on this matrix, ~0.2 s each)."""
    torch.manual_seed(1)
    w = torch.rand(128, 512)
    _, a = search_permutation(w, 2, 4, method="assignment", rounds=40, seed=0)
    _, s = search_permutation(w, 2, 4, method="swaps", rounds=4, seed=0)
    assert a["gap_closed"] > s["gap_closed"] + 0.02, (a["gap_closed"], s["gap_closed"])
    assert a["gap_closed"] > 0.38


@pytest.mark.parametrize("n,m", [(1, 4), (2, 8)])
def test_assignment_other_patterns(n, m):
    torch.manual_seed(4)
    w = torch.randn(16, 64 * m)
    perm, info = search_permutation(w, n, m, method="assignment", rounds=5)
    assert sorted(perm.tolist()) == list(range(64 * m))
    assert info["kept_after"] > info["kept_before"]
    assert info["kept_after"] == pytest.approx(kept_magnitude(w.abs()[:, perm], n, m), rel=1e-9)


def test_assignment_respects_time_budget():
    torch.manual_seed(1)
    w = torch.rand(256, 1024)
    _, free = search_permutation(w, 2, 4, time_budget=None)      # ≈30 rounds to convergence
    _, info = search_permutation(w, 2, 4, time_budget=0.05)
    assert info["method"] == "assignment" and info["rounds"] >= 1
    # the clock stops the search before convergence (round counts do not depend on machine load)
    assert info["rounds"] < free["rounds"]
    assert info["seconds"] < free["seconds"] + 1.0


def test_bad_method():
    with pytest.raises(ValueError, match="method"):
        search_permutation(torch.rand(4, 16), 2, 4, method="annealing")
