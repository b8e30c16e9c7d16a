"""Channel-permutation search for N:M sparsity (Pool & Yu, "Channel Permutations for N:M Sparsity",
NeurIPS 2021).

The N:M mask runs along the input dimension of a weight ``W [out, in]``: in every group of ``M``
consecutive columns each row keeps its ``N`` largest ``|w|``.  Permuting the columns (and the
producer's output channels accordingly) changes which columns share a group, and so how much
magnitude the mask keeps.  :func:`search_permutation` looks for a column permutation that keeps
more.

Algorithm (greedy channel swaps between groups plus escapes for small matrices, assignment moves
for large ones):

* For a group with one column removed, let ``S`` be the per-row sum of the top-``N`` of the
  ``M-1`` remaining values and ``t`` the ``N``-th largest of them.  Putting a new value ``x`` in the
  freed slot keeps ``S + relu(x - t)`` in that row.  So the kept magnitude of "group g with
  position p replaced by the column now at position q" is ``D[p, q] = sum_r S[r,p] +
  sum_r relu(x[r,q] - t[r,p])``, and the gain of swapping positions ``p`` and ``q`` (different
  groups) is ``D[p,q] + D[q,p] - K[g(p)] - K[g(q)]`` -- all ``M x M`` swaps of all group pairs in
  one batched tensor expression.
* The gain matrix is kept up to date incrementally: a swap between groups ``a`` and ``b`` only
  changes the rows/columns of the ``2M`` positions of those two groups (and the ``D`` columns of
  the two moved positions), so one step costs ``O(M * C * R)`` instead of ``O(C^2 * R)``.
* Greedy: apply the best positive swap until none is left (a local optimum).
* Escapes (iterated local search): perturb the best-known state by a few random swaps between
  random groups (a bounded regression), run greedy again, keep the result if it beats the best,
  otherwise undo back to the best.
* Large matrices (more than ``block_groups`` groups), by default: **assignment moves** (an
  ejection-chain neighbourhood, much larger than pairwise swaps).  Each round takes one random
  position ``p_g`` out of every group ``g`` (of a random subset of at most ``assign_groups``
  groups), which leaves ``k`` holes and ``k`` loose columns, and puts the loose columns back
  optimally: the new kept magnitude is ``sum_g D[p_g, p_sigma(g)]`` for an assignment ``sigma``,
  which is a linear assignment problem on the ``k x k`` matrix ``D`` (solved exactly by
  ``scipy.optimize.linear_sum_assignment``).  The identity is one assignment, so a round never
  loses; a pairwise swap is the special case of a 2-cycle, and one round can move every group at
  once.  The ``k x k`` matrix costs one ``R k^2`` pass: with ``relu(a) = (a + |a|) / 2``,
  ``sum_r relu(x[r,q] - t[r,p]) = (sum_r x[r,q] - sum_r t[r,p] + ||x_q - t_p||_1) / 2``, and the
  L1 distances of all pairs are one ``torch.cdist(p=1)`` call.  When rounds stop gaining, an
  escape restarts from the best state with a few random column swaps (bounded regression).
* ``method="swaps"`` on large matrices: the groups are split into random "stripe blocks" of at
  most ``block_groups`` groups; each block is solved independently (greedy + escapes), and the
  blocks are re-drawn each round so that columns can travel between any groups.

The result is always a valid permutation, never keeps less than the identity order, and is
deterministic for a given seed when no ``time_budget`` is set (a wall-clock budget makes the
stopping point -- and therefore possibly the result -- depend on machine speed).
"""
from __future__ import annotations

import math
import time
from typing import Optional

import numpy as np
import torch

try:                                  # the assignment search's solver; without SciPy, "auto" uses swaps
    from scipy.optimize import linear_sum_assignment
except ImportError:                   # pragma: no cover - SciPy is a dependency
    linear_sum_assignment = None

__all__ = ["kept_magnitude", "unstructured_bound", "search_permutation", "apply_permutation"]


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------

def _check_nm(n: int, m: int, cols: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int)) or m <= 0 or n < 0 or n > m:
        raise ValueError(f"invalid N:M = {n}:{m}")
    if cols % m:
        raise ValueError(f"number of columns ({cols}) is not a multiple of M={m}")


def kept_magnitude(w_abs: torch.Tensor, n: int, m: int) -> float:
    """Total ``|w|`` kept by the N:M mask over the columns of ``w_abs`` ``[rows, cols]`` in their
    current order (groups of ``m`` consecutive columns, ``n`` largest kept per row and group)."""
    w_abs = torch.as_tensor(w_abs).abs().double()
    if w_abs.dim() != 2:
        raise ValueError("expected a 2-D matrix")
    r, c = w_abs.shape
    _check_nm(n, m, c)
    if n == 0 or c == 0:
        return 0.0
    return float(w_abs.reshape(r, c // m, m).topk(n, dim=-1).values.sum())


def unstructured_bound(w_abs: torch.Tensor, n: int, m: int) -> float:
    """Upper bound on what any column permutation can keep: per row, the largest ``n/m`` of the
    row's entries, freely chosen."""
    w_abs = torch.as_tensor(w_abs).abs().double()
    r, c = w_abs.shape
    _check_nm(n, m, c)
    k = (c // m) * n
    if k == 0:
        return 0.0
    return float(w_abs.topk(k, dim=1).values.sum())


def apply_permutation(w: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Columns of ``w`` in the order ``perm`` (``w[:, perm]``)."""
    return w[:, perm]


# --------------------------------------------------------------------------------------------------
# Group statistics (shared by both searches)
# --------------------------------------------------------------------------------------------------

def _group_stats(v: np.ndarray, n: int, m: int):
    """For ``v [R, g*M]`` (``g`` whole groups): ``S [R, g, M]``, the top-``n`` sum of the group
    with position ``p`` removed; ``T [R, g, M]``, the ``n``-th largest of the remaining values
    (a new value ``x`` in the freed slot keeps ``S + relu(x - T)``); ``K [g]`` (float64), the
    kept magnitude of each group."""
    R = v.shape[0]
    if v.size < (1 << 16):
        # small (the swap search's per-step updates): NumPy, whose per-call overhead is lower
        v = v.reshape(R, -1, m)
        idx = np.argsort(-v, axis=-1, kind="stable")
        sv = np.take_along_axis(v, idx, -1)
        rank = np.empty_like(idx)
        np.put_along_axis(rank, idx, np.broadcast_to(np.arange(m), idx.shape), -1)
        topn = sv[..., :n].sum(-1, keepdims=True)                                # [R, g, 1]
        in_top = rank < n
        S = np.where(in_top, topn + sv[..., n:n + 1] - v, topn)
        T = np.where(in_top, sv[..., n:n + 1], sv[..., n - 1:n])
        return S, T, topn.sum(0, dtype=np.float64).reshape(-1)
    # large (a whole matrix per assignment round): torch's sort is faster
    t = torch.from_numpy(np.ascontiguousarray(v)).reshape(R, -1, m)
    sv, idx = torch.sort(t, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(idx)
    rank.scatter_(-1, idx, torch.arange(m).expand_as(idx))
    topn = sv[..., :n].sum(-1, keepdim=True)                                     # [R, g, 1]
    in_top = rank < n
    S = torch.where(in_top, topn + sv[..., n:n + 1] - t, topn)
    T = torch.where(in_top, sv[..., n:n + 1], sv[..., n - 1:n])
    return S.numpy(), T.numpy(), topn.sum(0, dtype=torch.float64).reshape(-1).numpy()


# --------------------------------------------------------------------------------------------------
# Assignment moves: one column out of every group, all put back optimally (large matrices)
# --------------------------------------------------------------------------------------------------

def _replacement_matrix(S: np.ndarray, T: np.ndarray, x: np.ndarray, gs: np.ndarray, slot: np.ndarray,
                        pos: np.ndarray) -> np.ndarray:
    """``D [k, k]``: kept magnitude of group ``gs[i]`` with its position ``slot[i]`` holding the
    column now at ``pos[j]`` = ``sum_r S + sum_r relu(x - t)``, the relu sums from L1 distances."""
    t = torch.from_numpy(np.ascontiguousarray(T[:, gs, slot].T))                 # [k, R]
    xq = torch.from_numpy(np.ascontiguousarray(x[:, pos].T))                     # [k, R]
    l1 = torch.cdist(t[None], xq[None], p=1.0)[0]                                # [k, k]
    d = (l1 + xq.sum(1)[None, :] - t.sum(1)[:, None]) * 0.5
    return d.numpy().astype(np.float64) + S[:, gs, slot].sum(0, dtype=np.float64)[:, None]


def _assignment_search(w_abs: torch.Tensor, n: int, m: int, rounds: int, max_iters: int, deadline: float,
                       gen: torch.Generator, assign_groups: int, patience: int, escapes: int, kick_size: int):
    """Assignment-move rounds on ``w_abs [R, C]``; returns (order, moves, rounds done, escapes).

    Every round recomputes the group statistics once, splits the groups at random into chunks of
    at most ``assign_groups``, and in each chunk solves the assignment of the loose columns to the
    holes.  A chunk's move is applied when its predicted gain is positive; the exact kept total
    (float64) is checked at the next round and a round that lost (float32 rounding in ``D``) is
    undone.  Stops after ``rounds`` rounds, before a round that would end past the deadline (judged
    by the last round's time) or after ``max_iters`` moved columns.  After ``patience`` rounds in a
    row without gain the search has stalled: it escapes (at most ``escapes`` times) by restarting
    from the best state with ``kick_size`` random column pairs swapped -- a bounded regression
    that the next rounds usually more than repair; the best state seen is returned."""
    x = w_abs.numpy().astype(np.float32, copy=True)
    R, C = x.shape
    G = C // m
    order = np.arange(C)
    S, T, K = _group_stats(x, n, m)
    best = cur = float(K.sum())
    best_x, best_order = x.copy(), order.copy()
    eps = 1e-6 * max(1.0, best) / max(1, G)
    k = max(2, min(G, int(assign_groups)))
    moves = done = idle = 0
    last = 0.0                                   # seconds the last round took
    kicks = 0
    while done < rounds and moves < max_iters and time.perf_counter() + last < deadline:
        if idle >= patience:
            # stalled in a local optimum: escape from the best state by a bounded random kick
            # (``kick_size`` random columns swapped across groups), unless escapes are used up
            if kicks >= escapes:
                break
            kicks += 1
            x, order = best_x.copy(), best_order.copy()
            a = torch.randperm(C, generator=gen)[:2 * kick_size].numpy()
            x[:, a] = x[:, a[::-1]]
            order[a] = order[a[::-1]]
            S, T, K = _group_stats(x, n, m)
            cur, idle = float(K.sum()), 0
        t_round = time.perf_counter()
        done += 1
        gperm = torch.randperm(G, generator=gen).numpy()
        slots = torch.randint(m, (G,), generator=gen).numpy()
        nchunks = math.ceil(G / k)
        new_x, new_order = x.copy(), order.copy()
        predicted = 0.0
        for ci in range(nchunks):
            gs = gperm[ci::nchunks]                       # nearly equal chunks
            if len(gs) < 2:
                continue
            slot = slots[gs]
            pos = gs * m + slot
            D = _replacement_matrix(S, T, x, gs, slot, pos)
            rows, cols = linear_sum_assignment(D, maximize=True)
            gain = float(D[rows, cols].sum() - np.trace(D))
            if gain > eps:
                changed = rows != cols
                dst, src = pos[rows[changed]], pos[cols[changed]]
                new_x[:, dst] = x[:, src]
                new_order[dst] = order[src]
                moves += int(changed.sum())
                predicted += gain
            if time.perf_counter() > deadline:
                break
        last = time.perf_counter() - t_round
        if predicted <= eps:
            idle += 1
            continue
        S2, T2, K2 = _group_stats(new_x, n, m)
        tot = float(K2.sum())
        if tot > cur + eps:
            x, order, S, T, cur = new_x, new_order, S2, T2, tot
            idle = 0
            if tot > best + eps:
                best, best_x, best_order = tot, x, order
        else:
            idle += 1
    return torch.from_numpy(best_order), moves, done, kicks


# --------------------------------------------------------------------------------------------------
# Block solver: greedy swaps + escapes on a set of groups
# --------------------------------------------------------------------------------------------------

class _Block:
    """Incremental swap-gain state for a matrix ``x [R, G*M]`` (columns are the positions).

    The per-step work is on small arrays, where per-call dispatch dominates, so the state is kept
    in NumPy (float32 arrays, float64 group totals); the batched full evaluation is one expression.
    """

    def __init__(self, x, n: int, m: int):
        self.x = np.array(x, dtype=np.float32, copy=True, order="C")
        self.n, self.m = n, m
        self.R, self.C = self.x.shape
        self.G = self.C // m
        self.pos_group = np.arange(self.C) // m
        self.order = np.arange(self.C)          # order[pos] = local column index now at pos
        self.K = np.empty(self.G, dtype=np.float64)
        self.Ssum = np.empty(self.C, dtype=np.float32)
        self.T = np.empty((self.R, self.C), dtype=np.float32)
        self._stats(np.arange(self.G))
        self.D = self._d_block(np.arange(self.C), np.arange(self.C))
        self.same = self.pos_group[:, None] == self.pos_group[None, :]
        Kp = self.K[self.pos_group]
        self.gain = self.D + self.D.T - Kp[:, None] - Kp[None, :]
        self.gain[self.same] = -np.inf

    def _stats(self, groups) -> None:
        m = self.m
        pos = (groups[:, None] * m + np.arange(m)[None, :]).reshape(-1)        # [g*M]
        S, T, K = _group_stats(self.x[:, pos], self.n, m)
        self.K[groups] = K
        self.Ssum[pos] = S.sum(0).reshape(-1)
        self.T[:, pos] = T.reshape(self.R, -1)

    def _d_block(self, rows, cols):
        """D[rows][:, cols]: kept of group(p) with position p replaced by the column at q."""
        T = self.T[:, rows]
        X = self.x[:, cols]
        out = np.zeros((len(rows), len(cols)), dtype=np.float32)
        ch = max(1, min(self.R, (1 << 21) // max(1, len(rows) * len(cols))))
        for r0 in range(0, self.R, ch):
            d = X[r0:r0 + ch, None, :] - T[r0:r0 + ch, :, None]
            np.maximum(d, 0.0, out=d)
            out += d.sum(0)
        out += self.Ssum[rows][:, None]
        return out

    def total(self) -> float:
        return float(self.K.sum())

    def swap(self, p: int, q: int) -> None:
        """Swap the columns at positions p and q (different groups) and update the gains."""
        self.swap_many([(p, q)])

    def swap_many(self, pairs) -> None:
        """Apply swaps that touch pairwise-disjoint groups, then update the gains once."""
        m = self.m
        P = np.array([p for p, _ in pairs])
        Q = np.array([q for _, q in pairs])
        x = self.x
        x[:, np.r_[P, Q]] = x[:, np.r_[Q, P]]
        self.order[np.r_[P, Q]] = self.order[np.r_[Q, P]]
        groups = np.unique(np.r_[P // m, Q // m])
        self._stats(groups)
        S = (groups[:, None] * m + np.arange(m)[None, :]).reshape(-1)
        moved = np.r_[P, Q]
        D = self.D
        D[S] = self._d_block(S, np.arange(self.C))            # rows of the touched groups
        D[:, moved] = self._d_block(np.arange(self.C), moved)  # columns of the moved positions
        Kp = self.K[self.pos_group]
        g_rows = D[S] + D[:, S].T - Kp[S][:, None] - Kp[None, :]
        g_rows[self.same[S]] = -np.inf
        self.gain[S] = g_rows
        self.gain[:, S] = g_rows.T

    def best_many(self, eps: float, limit: int):
        """Positive swaps on pairwise-disjoint groups, best first (each gain stays exact when they
        are applied together, since a swap's gain depends only on its two groups)."""
        g = self.gain
        k = min(limit, g.size)
        flat = np.argpartition(g, g.size - k, axis=None)[g.size - k:]
        vals = g.reshape(-1)[flat]
        keep = vals > eps
        flat, vals = flat[keep], vals[keep]
        flat = flat[np.argsort(-vals, kind="stable")]
        used = set()
        out = []
        m = self.m
        for f in flat.tolist():
            p, q = divmod(f, self.C)
            a, b = p // m, q // m
            if a in used or b in used:
                continue
            used.add(a)
            used.add(b)
            out.append((p, q))
        return out

    def best(self):
        flat = int(np.argmax(self.gain))
        p, q = divmod(flat, self.C)
        return float(self.gain[p, q]), p, q


def _greedy(blk: _Block, max_steps: int, deadline: float, log: Optional[list], eps: float,
            batch: bool = False) -> int:
    """Apply improving swaps until none is left.  ``batch``: apply, per step, a set of improving
    swaps on disjoint groups (best first) -- same gains, far fewer updates on large blocks."""
    steps = 0
    while steps < max_steps:
        if batch:
            pairs = blk.best_many(eps, 4 * blk.G)
            if not pairs:
                break
            pairs = pairs[:max_steps - steps]
            blk.swap_many(pairs)
            if log is not None:
                log.extend(pairs)
            steps += len(pairs)
        else:
            g, p, q = blk.best()
            if not g > eps:
                break
            blk.swap(p, q)
            if log is not None:
                log.append((p, q))
            steps += 1
        if time.perf_counter() > deadline:
            break
    return steps


def _solve_block(x: torch.Tensor, n: int, m: int, escapes: int, max_steps: int, deadline: float,
                 gen: torch.Generator, kick: int, accept: float,
                 batch: bool = False) -> tuple[torch.Tensor, int, int]:
    """Greedy + escapes on x [R, G*M]; returns (local order of the best state, steps, escapes).

    Escapes walk over local optima: kick the current state with 1..kick random swaps between
    random groups, re-run greedy, and keep the new local optimum if it is better than the current
    one or worse by at most ``accept`` (absolute |w| units; 0 = only improvements); otherwise undo
    the kick and the greedy steps.  The best state seen is remembered and returned.
    """
    blk = _Block(x.numpy(), n, m)
    eps = 1e-5 * max(1.0, blk.total()) / max(1, blk.C)
    steps = _greedy(blk, max_steps, deadline, None, eps, batch)
    cur = best = blk.total()
    best_order = blk.order.copy()
    done = 0
    if blk.G < 2:
        return torch.from_numpy(best_order), steps, 0
    tol = float(accept)
    for _ in range(escapes):
        if steps >= max_steps or time.perf_counter() > deadline:
            break
        done += 1
        log: list = []
        k = 1 + int(torch.randint(kick, (1,), generator=gen))
        for _ in range(k):
            ga, gb = torch.randperm(blk.G, generator=gen)[:2].tolist()
            i, j = torch.randint(m, (2,), generator=gen).tolist()
            p, q = ga * m + i, gb * m + j
            blk.swap(p, q)
            log.append((p, q))
        steps += k
        steps += _greedy(blk, max_steps - steps, deadline, log, eps)
        tot = blk.total()
        if tot > best + eps:
            best = tot
            best_order = blk.order.copy()
        if tot > cur + eps or (tol > 0 and tot > cur - tol and tot < cur - eps):
            cur = tot
        else:
            for p, q in reversed(log):       # undo back to the current state
                blk.swap(p, q)
    return torch.from_numpy(best_order), steps, done


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------

def search_permutation(w: torch.Tensor, n: int = 2, m: int = 4, *, time_budget: Optional[float] = None,
                       max_iters: int = 1_000_000, escapes: Optional[int] = None, seed: int = 0,
                       block_groups: int = 32, rounds: Optional[int] = None, kick: int = 4,
                       accept: float = 0.0, batch: Optional[bool] = None, method: str = "auto",
                       assign_groups: int = 1024, patience: int = 5):
    """Search a permutation of the columns of ``w [out, in]`` that maximizes the magnitude kept by
    the N:M mask along the columns.

    Returns ``(perm, info)``: ``perm`` is a LongTensor with ``w[:, perm]`` the permuted matrix;
    ``info`` holds ``kept_before`` (identity order), ``kept_after``, ``total`` (sum |w|),
    ``bound`` (unstructured N/M bound), ``gap_closed`` = (after-before)/(bound-before),
    ``seconds``, ``iterations`` (swaps applied, escape kicks included), ``escapes`` (escape
    attempts), ``rounds``.

    ``time_budget`` (seconds) bounds the search by wall clock (then results may vary with machine
    speed); ``max_iters`` bounds the swaps (moved columns for ``"assignment"``); ``escapes`` is the
    number of escape attempts per block solve (default 400 when the matrix is one block, 0 in
    stripe-block mode; see below for ``"assignment"``).  Matrices with more than ``block_groups``
    groups are searched by ``method``:

    * ``"auto"`` (default): ``"swaps"`` when the matrix has at most ``block_groups`` groups, else
      ``"assignment"``;
    * ``"assignment"``: assignment-move rounds (see the module docstring) over random chunks of at
      most ``assign_groups`` groups, for ``rounds`` rounds (default: 30 without a time budget,
      else until the budget runs out); after ``patience`` rounds without gain an escape swaps
      ``kick // 2`` random column pairs of the best state (``escapes``: at most that many escapes,
      default unlimited); ``iterations`` counts the columns moved;
    * ``"swaps"``: random stripe blocks of ``block_groups`` groups solved by greedy swaps (+
      escapes), re-drawn for ``rounds`` rounds (default: 4 without a time budget, else until the
      budget runs out).

    ``kick``: escape perturbation size (1..kick random swaps); ``accept``: regression an escape
    may accept; ``batch``: apply disjoint improving swaps together (default: rows >= 256).
    """
    t0 = time.perf_counter()
    if method not in ("auto", "swaps", "assignment"):
        raise ValueError(f"method must be 'auto', 'swaps' or 'assignment'; got {method!r}")
    w = torch.as_tensor(w)
    if w.dim() != 2:
        raise ValueError("expected a 2-D weight [out, in]")
    R, C = w.shape
    _check_nm(n, m, C)
    w_abs = w.detach().abs().to(torch.float32)
    before = kept_magnitude(w_abs, n, m)
    total = float(w_abs.double().sum())
    bound = unstructured_bound(w_abs, n, m)
    ident = torch.arange(C, dtype=torch.long)
    G = C // m
    if batch is None:
        batch = R >= 256       # batched descent pays off when a swap update is expensive
    info = dict(n=n, m=m, shape=(R, C), total=total, kept_before=before, kept_after=before, bound=bound,
                gap_closed=0.0, seconds=0.0, iterations=0, escapes=0, rounds=0, method="none")
    if n == 0 or n == m or G < 2 or R == 0:
        info["seconds"] = time.perf_counter() - t0
        return ident, info

    gen = torch.Generator().manual_seed(int(seed))
    deadline = t0 + time_budget if time_budget is not None else math.inf
    perm = ident.clone()
    iters = esc = 0
    bg = max(2, int(block_groups))
    if method == "auto":
        method = "swaps" if G <= bg or linear_sum_assignment is None else "assignment"
    if method == "assignment" and linear_sum_assignment is None:
        raise ImportError("search_permutation(method='assignment') needs SciPy (pip install scipy)")
    if escapes is None:
        # one block: escapes are the main lever; stripe blocks: re-drawing the blocks (more
        # rounds of greedy descent) closed more of the gap per second than escapes did;
        # assignment: an escape whenever the search stalls, as long as rounds / time remain
        escapes = 10**9 if method == "assignment" else (400 if G <= bg else 0)
    if method == "assignment":
        if rounds is None:
            rounds = 10**9 if time_budget is not None else 30
        order, iters, nrounds, esc = _assignment_search(w_abs, n, m, rounds, max_iters, deadline, gen,
                                                   assign_groups, max(1, int(patience)), escapes,
                                                   max(1, int(kick) // 2))
        perm = perm[order]
    elif G <= bg:
        order, steps, done = _solve_block(w_abs, n, m, escapes, max_iters, deadline, gen, kick, accept, batch)
        perm = perm[order]
        iters, esc, nrounds = steps, done, 1
    else:
        nblocks = math.ceil(G / bg)
        if rounds is None:
            rounds = 10**9 if time_budget is not None else 4
        nrounds = 0
        cur = w_abs
        for _ in range(rounds):
            if time.perf_counter() > deadline or iters >= max_iters:
                break
            nrounds += 1
            gperm = torch.randperm(G, generator=gen)
            sizes = [G // nblocks + (1 if i < G % nblocks else 0) for i in range(nblocks)]
            new_pos = torch.empty(C, dtype=torch.long)     # new_perm over positions
            start = 0
            for bi, sz in enumerate(sizes):
                groups = gperm[start:start + sz]
                start += sz
                pos = (groups[:, None] * m + torch.arange(m)[None, :]).reshape(-1)
                if time_budget is not None:
                    # share the remaining time between this round's remaining blocks
                    left = max(0.0, deadline - time.perf_counter())
                    blk_deadline = time.perf_counter() + left / (nblocks - bi)
                else:
                    blk_deadline = math.inf
                order, steps, done = _solve_block(cur[:, pos], n, m, escapes, max_iters - iters,
                                                  blk_deadline, gen, kick, accept, batch)
                new_pos[pos] = pos[order]
                iters += steps
                esc += done
            cur = cur[:, new_pos]
            perm = perm[new_pos]
    after = kept_magnitude(w_abs[:, perm], n, m)
    if after < before:          # cannot happen (only improvements are kept), but guarantee it
        perm, after = ident, before
    info.update(kept_after=after, gap_closed=(after - before) / (bound - before) if bound > before else 0.0,
                seconds=time.perf_counter() - t0, iterations=iters, escapes=esc, rounds=nrounds, method=method)
    return perm, info
