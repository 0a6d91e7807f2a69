"""Ranking with exploration: a batch of user states -> top-K slates with exact propensities.

One matrix product ``user_states [B, d] @ item_matrix.T [d, I]`` and one top-k per chunk of
users; no per-user Python loop. Items a user has consumed are excluded by masking their scores
to ``-inf`` before selection.

Exploration modes
-----------------
- ``greedy``: the top-K by score; every propensity is 1.
- ``boltzmann``: a slate sampled *without replacement* from ``softmax(score / T)`` with the
  Gumbel-top-k trick (Kool et al., 2019): ``top-k(score / T + Gumbel noise)`` is exactly a
  Plackett–Luce sample, drawn for the whole batch at once.
- ``epsilon``: slot by slot, with probability ``1 - ε`` the best remaining item, with
  probability ``ε`` a uniformly random remaining item (vectorised over users; the loop runs over
  the K slots only).

Which propensity is logged (the one definition, end to end)
-----------------------------------------------------------
``propensity`` is the **single-draw probability over the allowed set**: the probability
β(a | s) that *one* draw from the serving policy's item distribution picks ``a``, where the
allowed set is every item the user may be shown (not watched; see
:class:`recsys.history.WatchedItems`). It is the same number for an item whatever slot it
landed in, and it is the probability that the policy's *first* draw (slot 0) is ``a``::

    boltzmann:  β(a|s) = exp(z_a / T) / Σ_{i allowed} exp(z_i / T)
    epsilon:    β(a|s) = (1 - ε)·[a is the best allowed item] + ε / |allowed|
    greedy:     1 (deterministic: the slate is certain; no off-policy weight can be formed)

This is what the learner's top-K correction (Chen et al., WSDM 2019) models: a slate as draws
from β, ``w = π/β · K(1−π)^(K−1)`` with π a softmax over the same allowed set. It is also what
first-slot IPS needs (:mod:`recsys.eval.ope`): ``P(slot 0 = a) = β(a|s)`` exactly.

:class:`Ranking` carries a second number, ``conditional``: the Plackett–Luce conditional
``p(a_j | a_<j)`` of the draw that produced the item at slot j (β renormalised over what was
still left; ε-greedy: ``(1-ε)·[best remaining] + ε/(allowed - j)``). Its product over the slate
is the exact probability of the whole slate (slate-level OPE); at slot 0 it equals β.
ε-greedy fits the single-draw model only at slot 0 (its later greedy slots have β = ε/|allowed|
although they are shown almost surely), so off-policy learning should use Boltzmann, the
default.

Scores are the raw inner products (before the temperature), so they mean the same in every mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from recsys.serving.device import resolve_device

Exploration = Literal["greedy", "boltzmann", "epsilon"]
EXPLORATIONS: tuple[str, ...] = ("greedy", "boltzmann", "epsilon")

# Rejection rounds per epsilon-greedy slot before the explicit-mask fallback (a round fails
# only when it hits an excluded or already chosen item).
_EPSILON_ROUNDS = 4

# Score-buffer elements per chunk on CUDA (float32: 256 MiB); see Policy's ``chunk_size``.
_CUDA_SCORE_BUFFER = 1 << 26

# Smallest propensity ever logged: the event contract's floor, ``recsys.events.MIN_PROPENSITY``
# (a test keeps them equal). Float32 softmax of an item far below the top can underflow to 0
# even though its true probability is positive.
MIN_PROPENSITY = 1e-30


@dataclass(frozen=True)
class Ranking:
    """Slates for a batch of ``B`` users, ``K`` slots each (shapes ``[B, K]``).

    ``valid[b, j]`` is False where user ``b`` had fewer than ``K`` allowed items; those slots hold
    index 0 and must be dropped (:meth:`rows` does).
    """

    items: torch.Tensor  # long [B, K], indices into the item matrix
    scores: torch.Tensor  # float [B, K], raw state·item scores
    propensities: torch.Tensor  # float64 [B, K], single-draw β(a|s) (the logged propensity)
    conditional: torch.Tensor  # float64 [B, K], Plackett–Luce p(a_j | a_<j) (see module doc)
    valid: torch.Tensor  # bool [B, K]

    def rows(self) -> list[list[tuple[int, float, float]]]:
        """Per user, the valid ``(item_index, score, propensity)`` in slate order (on CPU)."""
        items = self.items.cpu().tolist()
        scores = self.scores.float().cpu().tolist()
        props = self.propensities.cpu().tolist()
        if bool(self.valid.all()):  # the usual case: no per-slot filtering to do
            return [list(zip(*row, strict=True)) for row in zip(items, scores, props, strict=True)]
        valid = self.valid.cpu().tolist()
        return [
            [(i, s, p) for i, s, p, v in zip(ri, rs, rp, rv, strict=True) if v]
            for ri, rs, rp, rv in zip(items, scores, props, valid, strict=True)
        ]


def _check_args(exploration: str, temperature: float, epsilon: float) -> None:
    if exploration not in EXPLORATIONS:
        raise ValueError(f"exploration must be one of {EXPLORATIONS}, got {exploration!r}")
    number = isinstance(temperature, int | float)
    if not (number and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(epsilon, int | float) and 0.0 <= epsilon <= 1.0):
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")


def mask_excluded(scores: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """Set ``scores[b, exclude[b, m]]`` to -inf in place; entries < 0 (padding) are ignored."""
    if exclude is None or exclude.numel() == 0:
        return scores
    if exclude.shape[0] != scores.shape[0]:
        raise ValueError(f"exclude has {exclude.shape[0]} rows, scores {scores.shape[0]}")
    exclude = exclude.to(scores.device)
    keep = (exclude >= 0) & (exclude < scores.shape[1])
    rows = torch.arange(exclude.shape[0], device=scores.device).unsqueeze(1).expand_as(exclude)
    scores[rows[keep], exclude[keep]] = -math.inf
    return scores


def rank(
    user_states: torch.Tensor,
    item_matrix: torch.Tensor,
    k: int,
    *,
    exclude: torch.Tensor | None = None,
    exploration: Exploration = "boltzmann",
    temperature: float = 1.0,
    epsilon: float = 0.1,
    generator: torch.Generator | None = None,
    candidates: int | None = None,
) -> Ranking:
    """Top-``k`` slates for ``user_states [B, d]`` over ``item_matrix [I, d]``.

    ``exclude [B, M]`` (long, ``-1`` padding) lists item indices each user must not get.
    ``generator`` (on the tensors' device) makes sampling reproducible. ``candidates``: how
    many best-scoring items get explicit Gumbel noise in Boltzmann mode (default ``6 k``); it
    changes the cost, never the distribution.
    """
    _check_args(exploration, temperature, epsilon)
    if candidates is not None and (not isinstance(candidates, int) or candidates < 1):
        raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if user_states.dim() != 2 or item_matrix.dim() != 2:
        raise ValueError("user_states must be [B, d] and item_matrix [I, d]")
    if user_states.shape[1] != item_matrix.shape[1]:
        raise ValueError(
            f"user_states width {user_states.shape[1]} != item_matrix width {item_matrix.shape[1]}"
        )
    n_items = item_matrix.shape[0]
    if n_items == 0:
        raise ValueError("item_matrix has no items")
    k_eff = min(k, n_items)
    raw = user_states @ item_matrix.T  # [B, I]: the one matrix product
    mask_excluded(raw, exclude)
    if exploration == "greedy":
        top, idx = torch.topk(raw, k_eff, dim=1)
        valid = torch.isfinite(top)
        ones = torch.ones(top.shape, dtype=torch.float64, device=top.device)
        return _pad(Ranking(idx, top, ones, ones.clone(), valid), k)
    if exploration == "boltzmann":
        m = candidates if candidates is not None else 6 * k_eff
        return _pad(_boltzmann(raw, k_eff, temperature, generator, m), k)
    allowed = n_items - _excluded_counts(exclude, raw.shape[0], n_items, raw.device)
    return _pad(_epsilon_greedy(raw, k_eff, epsilon, generator, allowed), k)


def _excluded_counts(
    exclude: torch.Tensor | None, rows: int, n_items: int, device: torch.device
) -> torch.Tensor:
    """Distinct in-range item indices per row of ``exclude [B, M]`` (counting on the small
    exclusion lists is much cheaper than a pass over the ``[B, I]`` scores)."""
    if exclude is None or exclude.numel() == 0:
        return torch.zeros(rows, dtype=torch.long, device=device)
    ex = exclude.to(device)
    ex = torch.where((ex >= 0) & (ex < n_items), ex, torch.full_like(ex, -1))
    ex = ex.sort(dim=1).values
    new = torch.ones_like(ex, dtype=torch.bool)
    new[:, 1:] = ex[:, 1:] != ex[:, :-1]
    return (new & (ex >= 0)).sum(1)


def _gumbel(
    shape: tuple[int, ...], like: torch.Tensor, gen: torch.Generator | None
) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, device=like.device, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_(min=1e-300)))


def _boltzmann(
    raw: torch.Tensor,
    k: int,
    temperature: float,
    generator: torch.Generator | None,
    candidates: int,
) -> Ranking:
    """Exact Gumbel-top-k that draws noise for every item only when it has to.

    The ``m`` best-scoring items (the pool) get explicit Gumbel keys. For the other items R the
    Gumbel-max property gives the law of their largest key exactly: ``Gumbel(logsumexp_R z)``.
    When that key is below the pool's k-th key the slate is the pool's top-k and R needs no
    more noise. Otherwise R's best keys are drawn top-down (:func:`_rest_keys`) and merged.
    Either way the result has exactly the law of ``top-k(z + Gumbel)`` over all items.
    """
    bsz, n_items = raw.shape
    dev = raw.device
    z = raw.div_(temperature) if temperature != 1.0 else raw  # ours: scale in place
    m = min(n_items, max(candidates, k))
    cand_z, cand_idx = torch.topk(z, m, dim=1)  # [B, m]
    shift = cand_z[:, :1].clone()  # row max; -inf when every item is excluded
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    shift64 = shift.squeeze(1).double()
    p = z.sub_(shift).exp_()  # [B, I] unnormalised probabilities, 0 for excluded items
    p.scatter_(1, cand_idx, 0.0)  # from here on p holds R only
    # Summed directly, never as total − pool: R can be many orders of magnitude
    # below the pool, and the difference would be rounding noise.
    rest = p.sum(1).double()  # [B] mass of R
    log_rest = torch.log(rest) + shift64  # -inf if R is empty
    pool_z = cand_z.double()
    log_total = torch.logaddexp(log_rest, torch.logsumexp(pool_z, dim=1))

    pool_key = pool_z + _gumbel((bsz, m), p, generator)
    rest_max = log_rest + _gumbel((bsz,), p, generator)
    kth = torch.topk(pool_key, k, dim=1).values[:, -1]
    active = torch.nonzero(rest_max > kth).squeeze(1)
    all_idx, all_z, all_key = cand_idx, pool_z, pool_key
    if active.numel():
        r_idx, r_p, r_key = _rest_keys(
            p[active], rest[active], rest_max[active], shift64[active], kth[active], k, generator
        )
        ext_idx = torch.zeros((bsz, k), dtype=torch.long, device=dev)
        ext_p = torch.zeros((bsz, k), dtype=torch.float64, device=dev)
        ext_key = torch.full((bsz, k), -math.inf, dtype=torch.float64, device=dev)
        ext_idx[active], ext_p[active], ext_key[active] = r_idx, r_p, r_key
        all_idx = torch.cat([cand_idx, ext_idx], 1)
        ext_z = torch.log(ext_p) + shift64.unsqueeze(1)  # -inf where p is 0 (unused slots)
        all_z = torch.cat([pool_z, ext_z], 1)
        all_key = torch.cat([pool_key, ext_key], 1)
    order = torch.topk(all_key, k, dim=1).indices
    idx = all_idx.gather(1, order)
    zs = all_z.gather(1, order)
    valid = torch.isfinite(zs)
    in_slate = torch.zeros_like(all_z, dtype=torch.bool).scatter_(1, order, True)
    if active.numel():
        # R's slate items leave the unselected mass; they are p-values already in float64.
        taken = (ext_p * in_slate[:, m:]).sum(1)
        rest = (rest - taken).clamp_(min=0.0)
    # Mass of everything not in the slate: what is left of R plus the pool items left out.
    pool_rest = torch.logsumexp(all_z[:, :m].masked_fill(in_slate[:, :m], -math.inf), dim=1)
    log_unselected = torch.logaddexp(torch.log(rest) + shift64, pool_rest)
    zs_valid = zs.masked_fill(~valid, -math.inf)
    tail = torch.logcumsumexp(zs_valid.flip(1), dim=1).flip(1)  # log Σ_{i >= j} exp(z_i)
    log_denom = torch.logaddexp(tail, log_unselected.unsqueeze(1).expand_as(tail))
    cond = torch.exp(zs_valid - log_denom)
    first = torch.exp(zs_valid - log_total.unsqueeze(1))
    one = torch.ones_like(cond)
    cond = torch.where(valid, cond.clamp(MIN_PROPENSITY, 1.0), one)
    first = torch.where(valid, first.clamp(MIN_PROPENSITY, 1.0), one)
    scores = (zs * temperature).to(raw.dtype)
    return Ranking(idx, scores, first, cond, valid)


def _rest_keys(
    p: torch.Tensor,
    mass: torch.Tensor,
    top_key: torch.Tensor,
    shift: torch.Tensor,
    floor: torch.Tensor,
    k: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` largest Gumbel keys of the items R, given that the largest is ``top_key``.

    ``p [A, I]`` holds R's unnormalised probabilities (0 elsewhere), ``mass [A]`` their sum
    (float64), ``shift [A]`` the log-scale they were taken at, ``floor [A]`` a key below which
    nothing can enter the slate. Top-down construction of the Gumbel process (Maddison et al.,
    "A* sampling", 2014): the order of R's keys is a Plackett–Luce draw, independent of their
    values, and each next value is a Gumbel at the log-mass left, truncated below the previous
    key. The Plackett–Luce order is the order of first appearance in i.i.d. draws ∝ p: ``3k``
    draws per row (:func:`_categorical_draws`) instead of a key for every item. Rows
    whose draws repeat too much to fill a needed slot draw it from an explicit mask.
    Returns ``(index, p, key)``, each ``[A, k]``; unused slots have key ``-inf`` and p 0.
    """
    a = p.shape[0]
    dev = p.device
    n = 3 * k
    draws = _categorical_draws(p, n, generator)  # [A, n]
    ok = p.gather(1, draws) > 0  # False only for a rounding overshoot at the very end
    seen_before = (draws.unsqueeze(2) == draws.unsqueeze(1)).tril_(-1).any(2)  # [A, n]
    first = ok & ~seen_before
    steps = torch.arange(n, device=dev).expand(a, n)
    order = torch.where(first, steps, steps + n).argsort(1)[:, :k]
    idx = draws.gather(1, order)  # [A, k] distinct items in Plackett–Luce order
    have = first.sum(1)  # slots filled by the draws
    pk = torch.zeros((a, k), dtype=torch.float64, device=dev)
    key = torch.full((a, k), -math.inf, dtype=torch.float64, device=dev)
    prev_key = top_key.clone()
    left = mass.clone()
    for j in range(k):
        live = (left > 0) & (prev_key > floor)
        if not bool(live.any()):
            break
        if j:
            # A Gumbel at log(left) truncated below the previous key, in closed form.
            g = torch.log(left) + shift + _gumbel((a,), p, generator)
            prev_key = torch.where(live, -torch.logaddexp(-prev_key, -g), prev_key)
        need = torch.nonzero(live & (have <= j)).squeeze(1)
        if need.numel():
            weights = p[need].double()
            weights.scatter_(1, idx[need, :j], 0.0)
            # ``left`` is a float64 difference; a row may have nothing left that it can see.
            empty = weights.sum(1) <= 0
            weights[empty, 0] = 1.0
            idx[need, j] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
            live[need[empty]] = False
        key[:, j] = torch.where(live, prev_key, key[:, j])
        taken = p.gather(1, idx[:, j : j + 1]).squeeze(1).double()
        pk[:, j] = torch.where(live, taken, pk[:, j])
        left = (left - pk[:, j]).clamp_(min=0.0)
    return idx, pk, key


# Items per block in :func:`_categorical_draws`: small enough that a draw's within-block
# cumulative sum is cheap, large enough that the per-block sums stay short.
_BLOCK = 32


def _categorical_draws(p: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` i.i.d. draws per row of ``p [A, I]`` (unnormalised, >= 0), as ``[A, n]`` indices.

    Two-level inverse CDF: a block of ``_BLOCK`` items ∝ its mass, then an item in it ∝ p.
    Exact, and it avoids a cumulative sum over every item (slow on CPU, and in float64 slower
    still). A row with no mass yields index 0; callers check ``p`` at the drawn index.
    """
    a, n_items = p.shape
    pad = (-n_items) % _BLOCK
    padded = torch.nn.functional.pad(p, (0, pad)) if pad else p
    blocks = padded.view(a, -1, _BLOCK)  # [A, nb, B]
    block_cum = blocks.sum(2).cumsum(1, dtype=torch.float64)  # [A, nb]
    u = torch.rand((a, n), generator=generator, device=p.device, dtype=torch.float64)
    target = u * block_cum[:, -1:]
    b = torch.searchsorted(block_cum, target, right=True).clamp_(max=blocks.shape[1] - 1)
    below = torch.where(b > 0, block_cum.gather(1, (b - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, b.unsqueeze(2).expand(a, n, _BLOCK))  # [A, n, B]
    inner_cum = inner.cumsum(2, dtype=torch.float64)
    j = torch.searchsorted(inner_cum, (target - below).unsqueeze(2), right=True).squeeze(2)
    return (b * _BLOCK + j.clamp_(max=_BLOCK - 1)).clamp_(max=n_items - 1)


def _epsilon_greedy(
    raw: torch.Tensor,
    k: int,
    epsilon: float,
    generator: torch.Generator | None,
    allowed_n: torch.Tensor,
) -> Ranking:
    """``allowed_n [B]``: how many items each user may get (not excluded)."""
    bsz, n_items = raw.shape
    dev = raw.device
    top, greedy = torch.topk(raw, k, dim=1)  # best-first candidates
    explore = torch.rand((bsz, k), generator=generator, device=dev) < epsilon
    picked = torch.zeros((bsz, k), dtype=torch.long, device=dev)
    prop = torch.ones((bsz, k), dtype=torch.float64, device=dev)
    first = torch.ones((bsz, k), dtype=torch.float64, device=dev)
    rows = torch.arange(bsz, device=dev)
    n = allowed_n.double()
    for j in range(k):
        prev = picked[:, :j]
        free = (greedy.unsqueeze(2) != prev.unsqueeze(1)).all(2) if j else None
        g_pos = free.float().argmax(1) if free is not None else torch.zeros_like(allowed_n)
        g_item = greedy[rows, g_pos]
        choice = g_item.clone()
        # Uniform draw among the remaining allowed items by rejection from a uniform proposal
        # (exact). A fixed number of rounds over all rows keeps the device free of host syncs;
        # rows still unresolved after them draw from an explicit mask.
        pending = explore[:, j] & (allowed_n > j)
        for _ in range(_EPSILON_ROUNDS):
            cand = torch.randint(0, n_items, (bsz,), generator=generator, device=dev)
            ok = pending & torch.isfinite(raw[rows, cand]) & (prev != cand.unsqueeze(1)).all(1)
            choice = torch.where(ok, cand, choice)
            pending = pending & ~ok
        todo = torch.nonzero(pending).squeeze(1)
        if todo.numel():
            weights = torch.isfinite(raw[todo]).double()
            weights.scatter_(1, prev[todo], 0.0)
            choice[todo] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        picked[:, j] = choice
        remaining = (n - j).clamp(min=1.0)
        prop[:, j] = (1.0 - epsilon) * (choice == g_item).double() + epsilon / remaining
        first[:, j] = (1.0 - epsilon) * (choice == greedy[:, 0]).double() + epsilon / n.clamp(
            min=1.0
        )
    valid = torch.arange(k, device=dev).unsqueeze(0) < allowed_n.unsqueeze(1)
    prop = torch.where(valid, prop, torch.ones_like(prop))
    first = torch.where(valid, first, torch.ones_like(first))
    del top
    return Ranking(picked, raw.gather(1, picked), first, prop, valid)


def _pad(r: Ranking, k: int) -> Ranking:
    """Widen to ``k`` slots when the catalogue has fewer than ``k`` items."""
    have = r.items.shape[1]
    if have == k:
        return r
    extra = k - have

    def widen(t: torch.Tensor, value: float | bool) -> torch.Tensor:
        pad = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
        return torch.cat([t, pad], dim=1)

    return Ranking(
        widen(r.items, 0),
        widen(r.scores, -math.inf),
        widen(r.propensities, 1.0),
        widen(r.conditional, 1.0),
        widen(r.valid, False),
    )


class Policy:
    """A ranking policy bound to one item matrix and device, ranking users in chunks.

    Parameters
    ----------
    item_matrix:
        ``[I, d]`` item vectors; moved to ``device`` once.
    exploration:
        ``"boltzmann"`` (default), ``"epsilon"`` or ``"greedy"``.
    temperature:
        Boltzmann temperature T > 0 (scores are divided by T before the softmax).
    epsilon:
        Epsilon-greedy exploration rate in [0, 1].
    chunk_size:
        Users per matrix product; bounds the ``[chunk, I]`` score buffer. Default (None): 1024
        on CPU; on CUDA, enough users for a buffer of about 256 MiB (fewer, larger launches).
    seed:
        Seeds the sampling generator (None: nondeterministic).
    device:
        Where to rank; default CUDA when available, else CPU.
    candidates:
        Boltzmann only: best-scoring items given explicit Gumbel noise (default ``6 k``); a cost
        knob, the sampled distribution is exact for any value.
    """

    def __init__(
        self,
        item_matrix: torch.Tensor,
        *,
        exploration: Exploration = "boltzmann",
        temperature: float = 1.0,
        epsilon: float = 0.1,
        chunk_size: int | None = None,
        seed: int | None = None,
        device: torch.device | str | None = None,
        candidates: int | None = None,
    ) -> None:
        _check_args(exploration, temperature, epsilon)
        if candidates is not None and (not isinstance(candidates, int) or candidates < 1):
            raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
        self.candidates = candidates
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if item_matrix.dim() != 2 or item_matrix.shape[0] == 0:
            raise ValueError("item_matrix must be a non-empty [I, d] tensor")
        self.device = resolve_device(device)
        if chunk_size is None:
            big = self.device.type == "cuda"
            chunk_size = max(1024, _CUDA_SCORE_BUFFER // item_matrix.shape[0]) if big else 1024
        self.item_matrix = item_matrix.detach().to(self.device, torch.float32).contiguous()
        self.exploration: Exploration = exploration
        self.temperature = float(temperature)
        self.epsilon = float(epsilon)
        self.chunk_size = chunk_size
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()

    @property
    def num_items(self) -> int:
        return int(self.item_matrix.shape[0])

    @torch.inference_mode()
    def rank(
        self, user_states: torch.Tensor, k: int, exclude: torch.Tensor | None = None
    ) -> Ranking:
        """Slates for ``user_states [B, d]``; ``exclude [B, M]`` item indices (-1 = padding)."""
        states = user_states.detach().to(self.device, torch.float32)
        parts: list[Ranking] = []
        for start in range(0, max(states.shape[0], 1), self.chunk_size):
            end = start + self.chunk_size
            parts.append(
                rank(
                    states[start:end],
                    self.item_matrix,
                    k,
                    exclude=None if exclude is None else exclude[start:end],
                    exploration=self.exploration,
                    temperature=self.temperature,
                    epsilon=self.epsilon,
                    generator=self.generator,
                    candidates=self.candidates,
                )
            )
        if len(parts) == 1:
            return parts[0]
        return Ranking(
            torch.cat([p.items for p in parts]),
            torch.cat([p.scores for p in parts]),
            torch.cat([p.propensities for p in parts]),
            torch.cat([p.conditional for p in parts]),
            torch.cat([p.valid for p in parts]),
        )
