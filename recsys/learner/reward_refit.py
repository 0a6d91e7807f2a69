"""Exact refits of the reward head: alternating least squares over the replay buffer.

The reward head's loss (:meth:`recsys.learner.trainer.Learner._reward_loss`) is a matrix
factorisation objective. Over the rows ``r`` the buffer holds, each weighted by how often
:meth:`recsys.replay_buffer.ReplayBuffer.sample` draws it::

    Σ_r w_r [(y_r − p_u·q_i − c_i − a_u)² + λ(‖p_u‖² + ‖q_i‖²)]      q_i = q^id_i + A·text_i

Adam on sampled batches moves a factor row only when its user or item is drawn, by about the
learning rate per step, so a user with a few dozen ratings is far from that minimum after the
steps a warm start or a minute of traffic allow. With the items fixed, each user's ``(p_u,
a_u)`` is a ridge regression over that user's rows, and with the users fixed each item's
``(q^id_i, c_i)`` is one too: alternating the two exact solves (ALS with the per-row L2 of
ALS-WR, Zhou et al. 2008) reaches the minimum in a few sweeps. Each solve is one batched
``(d+1) × (d+1)`` system per user or item present, the normal equations summed in row chunks
so memory stays bounded; the text projection ``A`` stays as gradient steps left it.

Shapes: ``R`` rows, ``G`` groups (users or items), ``k`` unknowns per group (``d`` factors and
a bias).
"""

from __future__ import annotations

import torch

from recsys.model import PolicyNet

# Rows (and groups) per chunk of outer products: about 4M floats of [rows, k, k] at a time.
_CHUNK_ELEMENTS = 1 << 22


def ridge_per_group(
    group: torch.Tensor,
    n_groups: int,
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    l2: float,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each group's ``θ_g [k]`` minimising ``Σ_r w_r[(y_r − θ_g·x_r)² + λ‖θ_g[:-1] + s_g‖²]``.

    ``group [R]`` in ``[0, G)``, ``x [R, k]`` (last column the bias's constant, unregularised),
    ``y, w [R]``, ``shift [G, k−1]`` (None: 0; the part of a factor fixed elsewhere, the text
    term, which the L2 also weighs) -> ``[G, k]`` (float32). Every group must have a row with
    ``w > 0``.

    >>> g = torch.tensor([0, 0, 1])
    >>> x = torch.tensor([[1.0, 1.0], [2.0, 1.0], [1.0, 1.0]])
    >>> theta = ridge_per_group(g, 2, x, torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), 0.0)
    >>> [round(v, 4) for v in theta[0].tolist()]  # y = 1·x + 0 fits group 0 exactly
    [1.0, 0.0]
    """
    k = x.shape[1]
    x, y, w = x.float(), y.float(), w.float()
    order = torch.argsort(group)
    group, x, y, w = group[order], x[order], y[order], w[order]
    bounds = torch.searchsorted(group, torch.arange(n_groups + 1, device=group.device)).tolist()
    reg = torch.ones(k, device=x.device)
    reg[-1] = 0.0
    eye = 1e-6 * torch.eye(k, device=x.device)
    out = torch.empty(n_groups, k, device=x.device)
    # Groups a block at a time, so the normal equations [block, k, k] stay bounded however
    # many users the buffer holds; rows are sorted by group, so a block's rows are a slice.
    block = max(1, _CHUNK_ELEMENTS // (k * k))
    for g0 in range(0, n_groups, block):
        g1 = min(n_groups, g0 + block)
        r0, r1 = bounds[g0], bounds[g1]
        gb = group[r0:r1] - g0
        a = torch.zeros(g1 - g0, k, k, device=x.device)
        b = torch.zeros(g1 - g0, k, device=x.device)
        for s in range(r0, r1, block):
            e = min(r1, s + block)
            xs, ws, gs = x[s:e], w[s:e], gb[s - r0 : e - r0]
            a.index_add_(0, gs, ws[:, None, None] * xs[:, :, None] * xs[:, None, :])
            b.index_add_(0, gs, (ws * y[s:e])[:, None] * xs)
        n = torch.zeros(g1 - g0, device=x.device).index_add_(0, gb, w[r0:r1])
        lam = l2 * n[:, None]
        a = a + torch.diag_embed(lam * reg) + eye
        if shift is not None:
            b[:, :-1] -= lam * shift[g0:g1].float()
        out[g0:g1] = torch.linalg.solve(a, b)
    return out


@torch.no_grad()
def refit_reward_head(
    model: PolicyNet,
    users: torch.Tensor,
    items: torch.Tensor,
    rewards: torch.Tensor,
    weights: torch.Tensor,
    l2: float,
    sweeps: int,
) -> None:
    """``sweeps`` alternating exact solves of the head's user rows, then its item rows, over
    the rows given (``users [R]`` buckets, -1 unknown; ``items [R]`` indices below the model's
    item count; ``rewards, weights [R]``), written into ``model.reward_head`` in place.

    Rows of unknown users fit only the item biases (their ``p`` is 0); with no known user at
    all (the offline benchmarks' rows carry none) there is nothing personal to fit and the head
    is left as it is. Users and items with no row of weight above 0 keep their values.
    """
    head = model.reward_head
    scale = head.SCALE
    keep = (items < model.num_items) & (weights > 0)
    users, items = users[keep].long(), items[keep].long()
    rewards, weights = rewards[keep].float(), weights[keep].float()
    known = users >= 0
    if not bool(known.any()):
        return
    u_ids, u_group = torch.unique(users[known], return_inverse=True)
    i_ids, i_group = torch.unique(items, return_inverse=True)
    q_id = scale * head.items[i_ids].float()
    text = model.reward_item_factors(i_ids).float() - q_id
    c = scale * head.bias[i_ids].float()
    p = scale * head.users[u_ids].float()
    a = scale * head.user_bias[u_ids].float()
    ones = torch.ones(len(items), 1, device=items.device)
    for _ in range(sweeps):
        q_rows = (q_id + text)[i_group[known]]
        theta = ridge_per_group(
            u_group,
            len(u_ids),
            torch.cat([q_rows, ones[known]], dim=1),
            rewards[known] - c[i_group[known]],
            weights[known],
            l2,
        )
        p, a = theta[:, :-1], theta[:, -1]
        p_rows = torch.zeros(len(items), head.dim, device=items.device)
        a_rows = torch.zeros(len(items), device=items.device)
        p_rows[known], a_rows[known] = p[u_group], a[u_group]
        y = rewards - a_rows - (p_rows * text[i_group]).sum(-1)
        theta = ridge_per_group(
            i_group, len(i_ids), torch.cat([p_rows, ones], dim=1), y, weights, l2, text
        )
        q_id, c = theta[:, :-1], theta[:, -1]
    dtype = head.items.dtype
    head.items[i_ids] = (q_id / scale).to(dtype)
    head.bias[i_ids] = (c / scale).to(dtype)
    head.users[u_ids] = (p / scale).to(dtype)
    head.user_bias[u_ids] = (a / scale).to(dtype)
