"""The models a user would pick instead of recsys, fitted on the offline evaluation's split.

Every peer sees the same training interactions, ranks the same candidates (the whole
catalogue) and has the user's seen items masked by the evaluation, not here. Each is tuned on
the validation item only, over a small grid (listed with each peer), and the test set is
scored once with the chosen setting:

- :class:`MostPopular` - training interaction counts (no parameters).
- :class:`ItemKNN` - cosine item-item similarity on the binary interaction matrix; score = sum
  of similarities to the history. Grid: shrinkage.
- :class:`EASE` - Steck (WWW 2019), closed form ``B = I − P·diag(1/diag P)``, ``P = (XᵀX + λI)⁻¹``
  over the items with at least one training interaction. Grid: λ.
- :class:`ImplicitMF` - implicit's ALS (Hu, Koren & Volinsky 2008) and BPR (Rendle et al. 2009).
  Grid: factors × regularisation (ALS), factors × learning rate (BPR). For the test ranking it is
  refitted with the validation item added (a matrix-factorisation user vector cannot take a new
  interaction otherwise; the sequential models read it from the history).
- :class:`SASRec` - a self-attentive sequential recommender (Kang & McAuley 2018) trained the way
  Klenitskiy & Vasilev (RecSys 2023) showed works: softmax cross-entropy at every position, here
  over the same shared sampled negatives as recsys's own training (full-catalogue softmax at every
  position does not fit the CPU budget); id embeddings only, no item bias, no seen-item masking in
  training, the same width, depth, history length, epochs and early stopping as recsys.

Scorers take ``(users, histories)`` (user indices into the split's user list, item-index lists)
and return ``[U, I]`` float scores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Scorer = Callable[[Sequence[int], Sequence[Sequence[int]]], torch.Tensor]


def interaction_matrix(rows: Sequence[Sequence[int]], num_items: int) -> Any:
    """Binary CSR user × item matrix (scipy) of ``rows`` (one item list per user)."""
    from scipy.sparse import csr_matrix

    indptr = np.cumsum([0, *(len(set(r)) for r in rows)])
    parts = [np.array(sorted(set(r)), dtype=np.int64) for r in rows]
    indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    data = np.ones(len(indices), dtype=np.float32)
    return csr_matrix((data, indices, indptr), shape=(len(rows), num_items))


def _dense_history(hists: Sequence[Sequence[int]], num_items: int) -> torch.Tensor:
    h = torch.zeros(len(hists), num_items)
    for b, items in enumerate(hists):
        if items:
            h[b, list(items)] = 1.0
    return h


class MostPopular:
    grid: tuple[dict[str, Any], ...] = ({},)

    def fit(self, rows: Sequence[Sequence[int]], num_items: int, **_: Any) -> Scorer:
        counts = torch.zeros(num_items)
        for r in rows:
            counts[list(r)] += 1.0
        return lambda users, hists: counts.unsqueeze(0).expand(len(hists), -1).clone()


class ItemKNN:
    """Cosine similarity ``c_ij / (sqrt(n_i n_j) + shrink)`` on the binary matrix."""

    grid: tuple[dict[str, Any], ...] = ({"shrink": 0.0}, {"shrink": 10.0}, {"shrink": 100.0})

    def fit(
        self, rows: Sequence[Sequence[int]], num_items: int, shrink: float = 0.0, **_: Any
    ) -> Scorer:
        key = (id(rows), len(rows), num_items)
        if getattr(self, "_key", None) != key:  # the grid shares one co-occurrence matrix
            x = interaction_matrix(rows, num_items)
            self._co = torch.from_numpy((x.T @ x).toarray().astype(np.float32))
            self._key = key
        co = self._co
        n = co.diagonal().clone().sqrt()
        sim = co / (n.unsqueeze(0) * n.unsqueeze(1) + shrink).clamp(min=1e-12)
        sim.fill_diagonal_(0.0)
        return lambda users, hists: _dense_history(hists, num_items) @ sim


class EASE:
    """Embarrassingly shallow autoencoder, closed form, on the items seen in training."""

    grid: tuple[dict[str, Any], ...] = ({"lam": 100.0}, {"lam": 400.0}, {"lam": 1600.0})

    def fit(
        self, rows: Sequence[Sequence[int]], num_items: int, lam: float = 400.0, **_: Any
    ) -> Scorer:
        x = interaction_matrix(rows, num_items)
        active = np.flatnonzero(np.asarray(x.sum(0)).ravel() > 0)
        xa = x[:, active]
        g = torch.from_numpy((xa.T @ xa).toarray().astype(np.float32))
        g.diagonal().add_(lam)  # λ >= 1 keeps it well conditioned in float32
        p = torch.cholesky_inverse(torch.linalg.cholesky(g))
        b32 = -p / p.diagonal().unsqueeze(0)
        b32.fill_diagonal_(0.0)
        act = torch.from_numpy(active)

        def score(users: Sequence[int], hists: Sequence[Sequence[int]]) -> torch.Tensor:
            h = _dense_history(hists, num_items)[:, act]
            out = torch.full((len(hists), num_items), -1e9)  # never-seen items: unrankable
            out[:, act] = h @ b32
            return out

        return score


@dataclass
class ImplicitMF:
    """implicit's ALS or BPR; scores ``user_factors @ item_factorsᵀ``."""

    algo: str  # "als" or "bpr"
    seed: int = 0

    @property
    def grid(self) -> tuple[dict[str, Any], ...]:
        if self.algo == "als":
            return tuple(
                {"factors": f, "regularization": r, "alpha": 10.0, "iterations": 15}
                for f in (64, 128)
                for r in (0.1, 10.0)
            )
        return tuple(
            {"factors": f, "learning_rate": lr, "regularization": 0.01, "iterations": 200}
            for f in (64, 128)
            for lr in (0.01, 0.05)
        )

    def fit(self, rows: Sequence[Sequence[int]], num_items: int, **params: Any) -> Scorer:
        from implicit.cpu.als import AlternatingLeastSquares
        from implicit.cpu.bpr import BayesianPersonalizedRanking
        from threadpoolctl import threadpool_limits

        x = interaction_matrix(rows, num_items)
        cls: Any = AlternatingLeastSquares if self.algo == "als" else BayesianPersonalizedRanking
        model = cls(num_threads=1, random_state=self.seed, **params)
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # implicit's BLAS-threads notice
            model.fit(x, show_progress=False)
        uf = torch.from_numpy(np.asarray(model.user_factors, dtype=np.float32))
        itf = torch.from_numpy(np.asarray(model.item_factors, dtype=np.float32))
        return lambda users, hists: uf[list(users)] @ itf.T


# --- SASRec --------------------------------------------------------------------------------


class SASRecNet(nn.Module):
    """Id embeddings (shared by input and output), learned positions, causal pre-LN transformer.

    ``forward(items [B, N])`` (left-padded with -1) -> hidden states ``[B, N, d]``; position ``j``
    has seen items ``<= j`` and predicts item ``j + 1``.
    """

    def __init__(
        self, num_items: int, dim: int, max_len: int, layers: int, heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        nn.init.normal_(self.emb.weight, std=0.02)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 2 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)
        self.pad = num_items
        self.max_len = max_len

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        n = items.shape[1]
        pad = items < 0
        x = self.emb(torch.where(pad, self.pad, items)) * math.sqrt(self.emb.embedding_dim)
        x = self.drop(x + self.pos[-n:])
        causal = torch.triu(torch.ones(n, n, dtype=torch.bool, device=items.device), 1)
        # left padding: a pad query may see itself so that no attention row is empty
        blocked = causal.unsqueeze(0) | pad.unsqueeze(1)
        blocked = blocked & ~torch.eye(n, dtype=torch.bool, device=items.device)
        heads = self.blocks.layers[0].self_attn.num_heads
        h = self.blocks(x, mask=blocked.repeat_interleave(heads, 0))
        return self.norm(h)

    def item_matrix(self) -> torch.Tensor:
        return self.emb.weight[: self.pad]


class SASRec:
    """Trainer and scorer for :class:`SASRecNet` on the split's training sequences."""

    def __init__(
        self,
        num_items: int,
        dim: int = 64,
        max_len: int = 50,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.1,
        lr: float = 1e-3,
        batch_size: int = 256,
        num_negatives: int = 1024,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        self.net = SASRecNet(num_items, dim, max_len, layers, heads, dropout)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.0)
        self.num_items, self.max_len = num_items, max_len
        self.batch_size, self.num_negatives = batch_size, num_negatives
        self.gen = torch.Generator().manual_seed(seed + 1)

    def step(self, chunks: torch.Tensor) -> float:
        """One step on a batch of ``[B, N+1]`` left-padded chunks (inputs ``[:, :-1]``)."""
        self.net.train()
        rows = chunks[torch.randint(0, len(chunks), (self.batch_size,), generator=self.gen)]
        inp, tgt = rows[:, :-1], rows[:, 1:]
        h = self.net(inp)
        real = (tgt >= 0) & (inp >= 0)  # the first item of a window is input only
        b, j = real.nonzero(as_tuple=True)
        q, t = h[b, j], tgt[b, j]
        neg = torch.randint(0, self.num_items, (self.num_negatives,), generator=self.gen)
        items = self.net.item_matrix()
        pos = (q * items[t]).sum(-1, keepdim=True)
        lq = math.log(self.num_negatives / self.num_items)
        negl = (q @ items[neg].T - lq).masked_fill(t.unsqueeze(1) == neg.unsqueeze(0), -math.inf)
        loss = F.cross_entropy(torch.cat([pos, negl], 1), torch.zeros_like(t))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.opt.step()
        return loss.item()

    @torch.no_grad()
    def scores(self, hists: Sequence[Sequence[int]]) -> torch.Tensor:
        self.net.eval()
        out = []
        items = self.net.item_matrix()
        for s in range(0, len(hists), 512):
            part = [list(h)[-self.max_len :] for h in hists[s : s + 512]]
            x = torch.full((len(part), self.max_len), -1, dtype=torch.long)
            for r, h in enumerate(part):
                if h:
                    x[r, -len(h) :] = torch.tensor(h)
            out.append(self.net(x)[:, -1] @ items.T)
        return torch.cat(out)


def sequence_chunks(seqs: Sequence[Sequence[int]], length: int) -> torch.Tensor:
    """Cut each item sequence into non-overlapping windows of ``length`` items, the last one
    ending at the sequence's end, left-padded with -1 -> ``[W, length]`` (each item once)."""
    out: list[list[int]] = []
    for seq in seqs:
        end = len(seq)
        while end > 0:
            start = max(0, end - length)
            w = list(seq[start:end])
            out.append([-1] * (length - len(w)) + w)
            end = start
    return torch.tensor(out, dtype=torch.long).reshape(-1, length)
