"""Objectives: off-policy top-K REINFORCE with a baseline, sampled softmax, contrastive terms,
the allowed-set masks, augmentations.

The learner (see :mod:`recsys.learner.trainer` for how they combine) uses:

- :func:`mask_seen` / :func:`mask_seen_sampled`: π over the allowed set (history items masked,
  as in serving), so that π and a logged propensity β are over the same items.
- :func:`advantage`, :func:`advantage_loss`: REINFORCE with a batch-mean baseline, bounded for
  negative advantages, so impressions with reward 0 teach something.
- :func:`correction_weights`: the correction of Chen et al. (WSDM 2019), detached::

      w = min(π/β, c) · K · (1 − π)^(K−1)

  where β was logged, 1 where it was not. What it can and cannot do: with a logged β it
  reweights samples drawn by an older policy towards the current one; without one (organic
  feedback such as MovieLens ratings) there is no logging policy to correct for, and a behaviour
  head trained on the same data as π only estimates β̂ ≈ π, so π/β̂ is 1 plus noise.
- :func:`nt_xent` with :func:`false_negative_pairs`: InfoNCE on cosine similarity between two
  views, false negatives masked.

Losses are means over rows, so a learning rate does not depend on the batch size. Shapes: ``B``
batch, ``I`` items, ``S`` sampled negatives, ``d`` width, ``N`` history length. Histories are
left-padded ``[B, N]`` LongTensors (see :mod:`recsys.history`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from recsys.history import MASK, PAD

# --- off-policy top-K REINFORCE ------------------------------------------------------------


def topk_correction(pi: torch.Tensor, beta: torch.Tensor, k: int, cap: float) -> torch.Tensor:
    """``min(π/β, c) · K(1−π)^(K−1)``, elementwise, detached. ``pi, beta [B]`` -> ``[B]``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    pi = pi.detach().float()
    beta = beta.detach().float()
    ratio = (pi / beta).clamp(max=cap)
    lam = k * (1.0 - pi).clamp(min=0.0).pow(k - 1)
    return ratio * lam


def action_log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[b, actions[b]]``: ``logits [B, I]``, ``actions [B]`` -> ``[B]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(1, actions.unsqueeze(1)).squeeze(1)


def behaviour_probability(
    propensity: torch.Tensor, beta_logits: torch.Tensor | None, actions: torch.Tensor
) -> torch.Tensor:
    """β of each logged action: the logged propensity where finite, else the behaviour head's.

    ``propensity [B]`` (NaN = unknown), ``beta_logits [B, I]`` -> ``[B]`` (detached).
    """
    known = torch.isfinite(propensity)
    if beta_logits is None:
        if not bool(known.all()):
            raise ValueError("propensity unknown for some samples and no behaviour logits given")
        return propensity.float()
    est = torch.softmax(beta_logits.detach().float(), dim=-1)
    est = est.gather(1, actions.unsqueeze(1)).squeeze(1)
    return torch.where(known, propensity.float(), est)


def reinforce_loss(
    log_pi_a: torch.Tensor, rewards: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """``−mean(w · R · log π(a|u))``; ``weights`` are treated as constants."""
    return -(weights.detach() * rewards.float() * log_pi_a).mean()


def off_policy_topk_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    beta: torch.Tensor,
    k: int,
    cap: float,
    normalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K off-policy REINFORCE over a (full or sampled) softmax.

    ``logits [B, I]``, ``actions [B]``, ``rewards [B]``, ``beta [B]`` -> ``(loss, weights [B])``.
    For a sampled softmax pass its logits with ``actions`` all 0 (the positive's column).
    ``normalize`` divides the weights by their batch mean (self-normalised importance
    weights): the same gradient direction, a scale that does not grow with ``K`` or ``c``.
    """
    log_pi_a = action_log_prob(logits, actions)
    w = topk_correction(log_pi_a.detach().exp(), beta, k, cap)
    used = w / w.mean().clamp(min=1e-12) if normalize else w
    return reinforce_loss(log_pi_a, rewards, used), w


def behaviour_loss(beta_logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the behaviour head on the logged actions (its own loss)."""
    return F.cross_entropy(beta_logits.float(), actions)


# --- sampled softmax with log-Q correction -------------------------------------------------


def sample_negatives(
    num_items: int,
    num: int,
    generator: torch.Generator | None = None,
    q: torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``num`` negatives (with replacement) -> ``(ids [S], log_q [S])``.

    Uniform over ``[0, num_items)`` unless ``q [I]`` (a proposal distribution, e.g. smoothed
    popularity) is given.
    """
    if q is None:
        ids = torch.randint(0, num_items, (num,), generator=generator, device=device)
        return ids, torch.full((num,), -math.log(num_items), device=ids.device)
    q = q[:num_items].float()
    q = q / q.sum()
    ids = torch.multinomial(q, num, replacement=True, generator=generator)
    return ids, torch.log(q[ids])


def sampled_softmax_logits(
    state: torch.Tensor,
    pos_vecs: torch.Tensor,
    neg_vecs: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    pos_log_q: torch.Tensor,
    neg_log_q: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logits ``[B, 1+S]`` of a sampled softmax with log-Q correction (Yi et al., RecSys 2019).

    Column 0 is the positive. Each logit is ``s·v/T − log Q(v)``; a sampled negative equal to the
    row's positive (an accidental hit) is masked out. ``state, pos_vecs [B, d]``, ``neg_vecs
    [S, d]``, ``pos_ids, pos_log_q [B]``, ``neg_ids, neg_log_q [S]``.
    """
    pos = (state * pos_vecs).sum(-1, keepdim=True).float() / temperature - pos_log_q.unsqueeze(1)
    neg = (state @ neg_vecs.T).float() / temperature - neg_log_q.unsqueeze(0)
    neg = neg.masked_fill(pos_ids.unsqueeze(1) == neg_ids.unsqueeze(0), float("-inf"))
    return torch.cat([pos, neg], dim=1)


# --- contrastive terms ----------------------------------------------------------------------


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: float = 0.1,
    k_ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE with in-batch negatives: row b's positive is ``k[b]``, the other rows negatives.

    Cosine similarities over ``temperature``. ``q, k [B, d]`` -> scalar. ``k_ids [B]`` marks
    duplicate keys (e.g. the same next item twice in a batch): those are not used as negatives.
    ``weights [B]`` weight each row's term (mean over the weights' sum).
    """
    qn = F.normalize(q.float(), dim=-1)
    kn = F.normalize(k.float(), dim=-1)
    logits = qn @ kn.T / temperature
    if k_ids is not None:
        dup = k_ids.unsqueeze(1) == k_ids.unsqueeze(0)
        dup.fill_diagonal_(False)
        logits = logits.masked_fill(dup, float("-inf"))
    target = torch.arange(q.shape[0], device=q.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    if weights is None:
        return per_row.mean()
    w = weights.float()
    return (w * per_row).sum() / w.sum().clamp(min=1e-12)


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    same: torch.Tensor | None = None,
) -> torch.Tensor:
    """NT-Xent between two views (CL4SRec): each of the 2B views has 1 positive, 2B−2 negatives.

    Cosine similarity over ``temperature``. ``z1, z2 [B, d]`` -> scalar. ``same [B, B]`` (bool)
    marks pairs of rows that are not true negatives of each other (e.g. the same next item, or
    the same user): both views of such a row are removed from the other's negatives.
    """
    bsz = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=-1)
    logits = z @ z.T / temperature
    blocked = torch.eye(2 * bsz, dtype=torch.bool, device=z.device)
    if same is not None:
        s = same.to(device=z.device, dtype=torch.bool)
        s = s & ~torch.eye(bsz, dtype=torch.bool, device=z.device)  # the positive stays
        blocked = blocked | s.repeat(2, 2)
    logits = logits.masked_fill(blocked, float("-inf"))
    target = torch.arange(2 * bsz, device=z.device).roll(bsz)
    return F.cross_entropy(logits, target)


def false_negative_pairs(*keys: torch.Tensor) -> torch.Tensor:
    """``[B, B]`` bool: rows equal on any of the keys (each ``[B]``; negative keys never match)."""
    out: torch.Tensor | None = None
    for k in keys:
        eq = (k.unsqueeze(0) == k.unsqueeze(1)) & (k >= 0).unsqueeze(0)
        out = eq if out is None else out | eq
    assert out is not None
    return out


# --- the allowed set: history items masked, as in serving ------------------------------------


def mask_seen(
    logits: torch.Tensor, history: torch.Tensor, upto: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Mask items already in the history, as the publisher excludes them from slates.

    ``logits [R, I]``; ``history [R, N]`` the history of each row's user (PAD < 0); ``upto [R]``:
    row ``r`` masks the items in history columns ``< upto[r]`` (the items before the position it
    predicts; ``N`` for the state after the whole history); ``target [R]`` is never masked (an
    item engaged again). Out of place; O(R·N) index work, no ``[R, I]`` mask. -> ``[R, I]``.
    """
    n = history.shape[1]
    cols = torch.arange(n, device=history.device).unsqueeze(0)
    hit = (cols < upto.unsqueeze(1)) & (history >= 0) & (history != target.unsqueeze(1))
    rows, k = hit.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return logits
    fill = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    return logits.index_put((rows, history[rows, k].long()), fill)


# Above this many B·I elements mask_seen_sampled compares history and negatives pairwise instead.
DENSE_MASK_ELEMENTS = 1 << 24


def mask_seen_sampled(
    logits: torch.Tensor,
    history: torch.Tensor,
    rows_b: torch.Tensor,
    upto: torch.Tensor,
    neg_ids: torch.Tensor,
) -> torch.Tensor:
    """:func:`mask_seen` for sampled-softmax logits ``[R, 1+S]`` (column 0 the positive).

    ``history [B, N]``, ``rows_b [R]`` each row's history, ``upto [R]`` as in :func:`mask_seen`,
    ``neg_ids [S]`` the shared negatives: a negative that row ``r``'s user has already seen
    (history columns ``< upto[r]``) is masked. A ``[B, I]`` first-column table while
    ``B·I <= DENSE_MASK_ELEMENTS``, else O(B·N·S) comparisons. -> ``[R, 1+S]``.
    """
    bsz, n = history.shape
    top = int(max(int(neg_ids.max()) if neg_ids.numel() else 0, int(history.max()))) + 1
    if bsz * top <= DENSE_MASK_ELEMENTS:
        # [B, I] table of each item's first history column (N where absent), then gather the
        # negatives: O(B·I + B·S), far less than B·N·S while the catalogue is small.
        cols = torch.arange(n, device=history.device).expand(bsz, n)
        table = torch.full((bsz, top + 1), n, dtype=torch.long, device=history.device)
        safe = torch.where(history >= 0, history.long(), top)  # PAD into a spare column
        table.scatter_reduce_(1, safe, cols, reduce="amin")
        first = table[:, neg_ids.long()]  # [B, S]
    else:
        eq = history.unsqueeze(2) == neg_ids.view(1, 1, -1)  # [B, N, S]
        cols3 = torch.arange(n, device=history.device).view(1, n, 1)
        first = torch.where(eq, cols3, n).amin(dim=1)  # [B, S]: first column holding it, or N
    if n < 32767:  # gather [R, S] in 16 bits: the rows outnumber the histories ~N times
        first, upto = first.to(torch.int16), upto.to(torch.int16)
    seen = first[rows_b] < upto.unsqueeze(1)  # [R, S]
    seen = torch.cat([torch.zeros_like(seen[:, :1]), seen], dim=1)
    return logits.masked_fill(seen, float("-inf"))


def advantage(rewards: torch.Tensor, baseline: bool) -> torch.Tensor:
    """``R − mean(R)`` over the batch (REINFORCE with a baseline), or ``R`` without.

    With the baseline a reward below the batch's mean (an impression shown and ignored, reward
    0) gets a negative advantage, so it moves probability *away* from that item; without it a
    zero reward teaches nothing.
    """
    r = rewards.float()
    return r - r.mean().detach() if baseline else r


def advantage_loss(
    log_pi_a: torch.Tensor, adv: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """REINFORCE with an advantage, bounded: ``−mean(w·(A⁺·log π(a) + A⁻·log(1 − π(a))))``.

    ``A⁺ = max(A, 0)``, ``A⁻ = max(−A, 0)``. For a positive advantage this is the policy
    gradient ``−A·log π``. For a negative one, ``+|A|·log π`` is unbounded below (an off-policy
    sample keeps pushing log π towards −∞ however unlikely the item already is), so it takes
    the unlikelihood form ``−|A|·log(1 − π)`` (Welleck et al., ICLR 2020): the same direction,
    probability moved away from the ignored item, vanishing once π(a) is small.
    ``log_pi_a, adv, weights [B]`` -> scalar; ``adv`` and ``weights`` are constants.
    """
    a = adv.detach().float()
    w = weights.detach().float()
    log_not = torch.log1p(-log_pi_a.exp().clamp(max=1.0 - 1e-6))
    return -(w * (a.clamp(min=0) * log_pi_a + (-a).clamp(min=0) * log_not)).mean()


def correction_weights(
    pi: torch.Tensor, propensity: torch.Tensor, k: int, cap: float, enabled: bool
) -> torch.Tensor:
    """Top-K off-policy weight where the propensity was logged, 1 where it was not. ``[B]``.

    Without a logged propensity there is no logging policy to correct for (organic behaviour,
    e.g. MovieLens ratings): a behaviour-head estimate ``β̂`` trained on the same data as ``π``
    gives ``π/β̂ ≈ 1`` plus noise, so such rows are weighted 1 (plain on-policy REINFORCE).
    """
    known = torch.isfinite(propensity)
    if not enabled:
        return torch.ones_like(pi, dtype=torch.float32)
    w = topk_correction(pi, torch.where(known, propensity.float(), torch.ones_like(pi)), k, cap)
    return torch.where(known, w, torch.ones_like(w))


def cosine_hinge(
    state: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, margin: float = 0.5
) -> torch.Tensor:
    """The seed's hinge: ``mean(max(0, margin − cos(s, v+) + cos(s, v−)))``.

    ``state, pos [B, d]``; ``neg [B, d]`` or ``[B, M, d]`` (each negative its own hinge term).
    """
    sp = F.cosine_similarity(state.float(), pos.float(), dim=-1)
    if neg.dim() == 2:
        sn = F.cosine_similarity(state.float(), neg.float(), dim=-1)
        return F.relu(margin - sp + sn).mean()
    sn = F.cosine_similarity(state.float().unsqueeze(1), neg.float(), dim=-1)
    return F.relu(margin - sp.unsqueeze(1) + sn).mean()


# --- augmentations (CL4SRec), vectorised over left-padded [B, N] histories --------------------


def _lengths(items: torch.Tensor) -> torch.Tensor:
    return (items != PAD).sum(1)


def crop(
    items: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Keep a random contiguous ``ceil(ratio·L)`` of each history (left-padded again)."""
    bsz, n = items.shape
    lengths = _lengths(items)
    keep = torch.ceil(ratio * lengths.float()).long().clamp(min=1).minimum(lengths)
    r = torch.rand(bsz, generator=generator, device=items.device)
    start = (
        (r * (lengths - keep + 1).float()).long().minimum(lengths - keep)
    )  # offset in the real part
    cols = torch.arange(n, device=items.device).unsqueeze(0)
    # output column j holds real item (j - (n - keep)) of the crop, taken from
    # source column (n - L) + start + (j - (n - keep)).
    src = (cols - lengths.unsqueeze(1) + start.unsqueeze(1) + keep.unsqueeze(1)).clamp(0, n - 1)
    out = items.gather(1, src)
    return torch.where(cols >= (n - keep).unsqueeze(1), out, torch.full_like(out, PAD))


def mask_items(
    items: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each real item with :data:`~recsys.history.MASK` with probability ``ratio``."""
    r = torch.rand(items.shape, generator=generator, device=items.device)
    return torch.where((r < ratio) & (items != PAD), torch.full_like(items, MASK), items)


def reorder(
    items: torch.Tensor, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Shuffle a random contiguous ``ceil(ratio·L)`` segment of each history."""
    bsz, n = items.shape
    lengths = _lengths(items)
    seg = torch.ceil(ratio * lengths.float()).long().minimum(lengths)
    r = torch.rand(bsz, generator=generator, device=items.device)
    c0 = (n - lengths) + (r * (lengths - seg + 1).float()).long().minimum(lengths - seg)
    cols = torch.arange(n, device=items.device).unsqueeze(0).expand(bsz, n)
    inside = (cols >= c0.unsqueeze(1)) & (cols < (c0 + seg).unsqueeze(1))
    noise = torch.rand(items.shape, generator=generator, device=items.device)
    # Inside keys lie in [c0 - 0.5, c0 + seg - 0.5): they permute among themselves only.
    key = torch.where(inside, c0.unsqueeze(1) - 0.5 + noise * seg.unsqueeze(1), cols.float())
    return items.gather(1, key.argsort(dim=1))


def augment(
    items: torch.Tensor,
    generator: torch.Generator | None = None,
    crop_ratio: float = 0.6,
    mask_ratio: float = 0.3,
    reorder_ratio: float = 0.6,
) -> torch.Tensor:
    """One of crop / mask / reorder per row, chosen uniformly at random (CL4SRec)."""
    choice = torch.randint(0, 3, (items.shape[0], 1), generator=generator, device=items.device)
    a = crop(items, crop_ratio, generator)
    b = mask_items(items, mask_ratio, generator)
    c = reorder(items, reorder_ratio, generator)
    return torch.where(choice == 0, a, torch.where(choice == 1, b, c))
