"""The policy network, in the torchrec style: small modules, a dataclass config, shapes documented.

Notation: ``B`` batch, ``N`` history length, ``I`` items held (the catalogue size), ``C`` item
capacity (rows allocated, ``C >= I``), ``D`` text-vector width, ``d`` model width.

- :class:`ItemTower`: frozen text vectors ``[C, D]`` -> learned adaptor MLP -> ``[C, d]``, plus an
  optional learned id embedding: ``LN(id + g·text)``, ``g`` a learned gate starting at 0 (the text
  is a residual on the id embedding). Rows beyond ``I`` are never scored.
- :class:`UserEncoder`: a small causal transformer (or GRU) over the last ``N`` item vectors
  behind a learned begin token -> user state ``[B, d]``; an empty history is served from the
  begin token alone (a new user).
- :class:`PolicyNet`: policy logits ``state @ items.T / T + bias`` (``T`` √d by default; a learned
  per-item bias, so popularity survives the item LayerNorm) and the behaviour head ``β`` on
  ``state.detach()`` (Chen et al., WSDM 2019), which estimates the logging policy when
  propensities are not logged.
- ``value_bias``: a per-item buffer the learner sets from counted reward statistics
  (:mod:`recsys.learner.item_value`: organic mean reward, position-debiased CTR), a pointwise
  reward model. Serving adds it to the policy logits; training does not (the learned bias
  would otherwise learn to cancel it), so it acts only on what is shown.
- :class:`RewardHead`: a personalised pointwise reward model ``r̂(u, i) = p_u·q_i + c_i + a_u``, a
  matrix factorisation with user factors in a fixed table of hashed user-id buckets, fitted by
  the learner to every record's reward (a rating's centred value, a click's weight, 0 for an
  impression ignored). The policy softmax learns *what a user engages with next*; the head
  learns *how well it pays*, with tables of its own. Serving adds its personal part
  ``reward_weight · p_u·q_i`` (a buffer the learner writes; 0 in checkpoints from before the
  head); an item's overall quality is the value bias's job, whose prior puts a new item at the
  average rather than at the head's untrained ``c = 0``.

Scoring space: :meth:`PolicyNet.item_vectors` is ``[I, 2d+1]`` (the tower's output; the bias
plus value bias times the temperature; the head's item factors times the temperature and
weight) and :meth:`PolicyNet.user_state` ``[B, 2d+1]`` (the encoder's state, a constant 1, the
head's user factor), so ``user_state @ item_vectors.T / temperature`` is the policy logits plus
the value bias plus ``reward_weight · p_u·q_i``: serving ranks with the training scores and both
reward models in one inner product.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from recsys.errors import ConfigError
from recsys.history import MASK, PAD

# Upper bounds on ModelConfig's sizes. A config may come from a checkpoint someone else wrote,
# and these sizes are allocated when the model is built, so an absurd one (a crafted
# item_capacity of 10^12) must fail validation, naming the field, instead of taking the learner
# or publisher down with an out-of-memory. Each bound is far above real use (defaults in
# brackets); the two products bound what the fields allocate together.
MODEL_SIZE_BOUNDS: dict[str, int] = {
    "text_dim": 8192,  # [384] the widest common text encoders are 4096
    "dim": 4096,  # [64]
    "max_history": 4096,  # [50] attention cost grows with its square
    "item_capacity": 1 << 24,  # [1024] 16.7M items; the catalogue grows by doubling up to it
    "adaptor_hidden": 16384,  # [256]
    "ffn_mult": 16,  # [2]
    "num_layers": 64,  # [2]
    "num_heads": 256,  # [2]
    "user_buckets": 1 << 24,  # [65536] the reward head's hashed user-factor rows
}
# item_capacity * (text_dim + dim): the text vectors plus the id embedding, 32 GiB of float32
# (2^24 items at the default widths is 7.5e9 elements, below it).
MAX_ITEM_TABLE_ELEMENTS = 1 << 33
# num_layers * dim^2 * (4 + 2 * ffn_mult): the transformer's weights, 8 GiB of float32.
MAX_ENCODER_ELEMENTS = 1 << 31


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of :class:`PolicyNet`; validated at construction.

    Every size is an int from 1 to its bound in :data:`MODEL_SIZE_BOUNDS`, and the item tables
    and the transformer stay within :data:`MAX_ITEM_TABLE_ELEMENTS` and
    :data:`MAX_ENCODER_ELEMENTS` elements; a violation raises ConfigError naming the field.
    """

    text_dim: int = 384
    dim: int = 64
    max_history: int = 50
    item_capacity: int = 1024
    adaptor_hidden: int = 256
    use_text: bool = True
    use_id_embedding: bool = True
    # With both towers: item = LN(id + g·adaptor(text)), g a learned scalar starting here (0: the
    # id embedding dominates at first and text enters as a residual only as far as it helps;
    # a cold item's id row is near its small init, so its text still decides its vector).
    text_gate_init: float = 0.0
    item_bias: bool = True  # a learned per-item bias (needs use_id_embedding: it is an id table)
    encoder: Literal["transformer", "gru"] = "transformer"
    num_layers: int = 2
    num_heads: int = 2
    ffn_mult: int = 2
    dropout: float = 0.1
    # The policy softmax's s·e/T. None: √dim. States and items leave a LayerNorm with norm ≈ √d,
    # so at T 1 the untrained logits have a std of ≈ √d and training first spends epochs
    # shrinking that noise (offline at T 1, validation NDCG@10 reached 0.057 at epoch 17, not 9).
    temperature: float | None = None
    user_buckets: int = 1 << 16  # rows of the reward head's user factors (user ids hashed)

    def __post_init__(self) -> None:
        for name, bound in MODEL_SIZE_BOUNDS.items():
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= bound:
                raise ConfigError(f"ModelConfig.{name} must be an int in [1, {bound}], got {v!r}")
        if self.dim % self.num_heads:
            raise ConfigError(
                f"ModelConfig.num_heads must divide dim={self.dim}, got {self.num_heads!r}"
            )
        table = self.item_capacity * (self.text_dim + self.dim)
        if self.user_buckets * self.dim > MAX_ITEM_TABLE_ELEMENTS:
            raise ConfigError(
                f"ModelConfig.user_buckets={self.user_buckets} with dim={self.dim} needs "
                f"{self.user_buckets * self.dim} user-factor elements, more than "
                f"{MAX_ITEM_TABLE_ELEMENTS}"
            )
        if table > MAX_ITEM_TABLE_ELEMENTS:
            raise ConfigError(
                f"ModelConfig.item_capacity={self.item_capacity} with text_dim={self.text_dim} "
                f"and dim={self.dim} needs {table} item-table elements, more than "
                f"{MAX_ITEM_TABLE_ELEMENTS}"
            )
        encoder = self.num_layers * self.dim**2 * (4 + 2 * self.ffn_mult)
        if encoder > MAX_ENCODER_ELEMENTS:
            raise ConfigError(
                f"ModelConfig.num_layers={self.num_layers} with dim={self.dim} and "
                f"ffn_mult={self.ffn_mult} needs {encoder} encoder weights, more than "
                f"{MAX_ENCODER_ELEMENTS}"
            )
        if self.encoder not in ("transformer", "gru"):
            raise ConfigError(
                f"ModelConfig.encoder must be 'transformer' or 'gru', got {self.encoder!r}"
            )
        for name in ("use_text", "use_id_embedding", "item_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("dropout", "text_gate_init"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ConfigError(f"ModelConfig.{name} must be a number, got {v!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not math.isfinite(self.text_gate_init):
            raise ConfigError(
                f"ModelConfig.text_gate_init must be finite, got {self.text_gate_init!r}"
            )
        t = self.temperature
        number = isinstance(t, int | float) and not isinstance(t, bool)
        if t is not None and not (number and math.isfinite(t) and t > 0):
            raise ConfigError(f"ModelConfig.temperature must be > 0 or None, got {t!r}")
        if not (self.use_text or self.use_id_embedding):
            raise ConfigError("ModelConfig: at least one of use_text / use_id_embedding is needed")

    @property
    def policy_temperature(self) -> float:
        """``T`` of the policy logits ``s·e/T``: ``temperature``, or √dim when that is None."""
        return math.sqrt(self.dim) if self.temperature is None else float(self.temperature)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"ModelConfig: unknown fields {sorted(unknown)}")
        return cls(**d)


class ItemTower(nn.Module):
    """Item vectors from frozen text vectors through a learned adaptor, plus an id embedding.

    Buffers: ``text_vectors [C, D]`` (frozen, from the text encoder; zero for id-only items) and
    ``num_items`` (``I``, a 0-d long). ``forward()`` -> ``[I, d]``; ``forward(idx)`` -> ``idx.shape
    + [d]`` for indices in ``[0, I)``.
    """

    text_vectors: torch.Tensor
    num_items: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("text_vectors", torch.zeros(cfg.item_capacity, cfg.text_dim))
        self.register_buffer("num_items", torch.zeros((), dtype=torch.long))
        # Python mirror of num_items: reading a CUDA buffer would sync the device every step.
        self.n_active = 0
        self.register_load_state_dict_post_hook(_refresh_n_active)
        self.adaptor: nn.Module | None = None
        if cfg.use_text:
            self.adaptor = nn.Sequential(
                nn.Linear(cfg.text_dim, cfg.adaptor_hidden),
                nn.GELU(),
                nn.Linear(cfg.adaptor_hidden, cfg.dim),
            )
        self.id_embedding: nn.Embedding | None = None
        if cfg.use_id_embedding:
            self.id_embedding = nn.Embedding(cfg.item_capacity, cfg.dim)
            nn.init.normal_(self.id_embedding.weight, std=0.02)
        # The text residual's learned scale (used only when both towers are on). Checkpoints
        # written before it existed load with 1 (their plain sum).
        self.text_gate = nn.Parameter(torch.tensor(float(cfg.text_gate_init)))
        self.register_load_state_dict_pre_hook(_default_text_gate)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def capacity(self) -> int:
        return int(self.text_vectors.shape[0])

    def forward(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        n = self.n_active
        out: torch.Tensor | None = None
        if self.adaptor is not None:
            text = self.text_vectors[:n] if idx is None else self.text_vectors[idx]
            out = self.adaptor(text)
        if self.id_embedding is not None:
            ids = self.id_embedding.weight[:n] if idx is None else self.id_embedding(idx)
            out = ids if out is None else ids + self.text_gate.to(out.dtype) * out
        assert out is not None
        return self.norm(out)


def _default_text_gate(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Checkpoints from before the text gate load with gate 1: the plain sum they trained."""
    key = prefix + "text_gate"
    if key not in state_dict and prefix + "text_vectors" in state_dict:
        state_dict[key] = torch.ones(())


def _refresh_n_active(module: ItemTower, incompatible_keys: object) -> None:
    module.n_active = int(module.num_items)


class UserEncoder(nn.Module):
    """User state from the last ``N`` item vectors.

    ``forward(item_vecs [B, N, d], items [B, N])`` -> ``state [B, d]``. ``items`` carries
    :data:`~recsys.history.PAD` (left padding) and :data:`~recsys.history.MASK`; masked
    positions get a learned mask vector. A learned begin token precedes the sequence, so the
    state of an empty history is defined.
    """

    causal: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.begin = nn.Parameter(torch.randn(d) * 0.02)
        self.mask_vec = nn.Parameter(torch.randn(d) * 0.02)
        self.pos = nn.Parameter(torch.randn(cfg.max_history + 1, d) * 0.02)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer: nn.TransformerEncoder | None = None
        self.gru: nn.GRU | None = None
        if cfg.encoder == "transformer":
            layer = nn.TransformerEncoderLayer(
                d,
                cfg.num_heads,
                dim_feedforward=cfg.ffn_mult * d,
                dropout=cfg.dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.transformer = nn.TransformerEncoder(
                layer, cfg.num_layers, enable_nested_tensor=False
            )
        else:
            self.gru = nn.GRU(d, d, num_layers=cfg.num_layers, batch_first=True)
        self.out_norm = nn.LayerNorm(d)
        causal = torch.triu(torch.ones(cfg.max_history + 1, cfg.max_history + 1), diagonal=1)
        self.register_buffer("causal", causal.bool(), persistent=False)

    def forward(self, item_vecs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``[B, N, d]``, ``[B, N]`` -> state ``[B, d]`` after the whole history."""
        if self.training or self.transformer is None:
            return self.forward_all(item_vecs, items)[0]
        # Serving needs the last position only: the last layer computes just that row (its
        # keys and values still come from every position), about a third less work at 2 layers.
        x, mask = self._layout(item_vecs, items)
        *body, last = self.transformer.layers
        for layer in body:
            x = layer(x, src_mask=mask)
        h = last.norm1(x)
        q_mask = mask[:, -1:]  # [B*H, 1, N+1]
        y = x[:, -1:] + last.self_attn(h[:, -1:], h, h, attn_mask=q_mask, need_weights=False)[0]
        y = y + last._ff_block(last.norm2(y))
        return self.out_norm(y[:, 0])

    def _with_begin(
        self, item_vecs: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What both encoders start from: ``[begin, items..]`` ``[B, N+1, d]`` with the mask
        vector at masked positions, column numbers ``[1, N+1]``, where the begin token belongs
        in the left-padded layout ``[B, 1]``, and history lengths ``[B]``."""
        bsz, n, d = item_vecs.shape
        lengths = (items != PAD).sum(1)
        x = torch.where((items == MASK).unsqueeze(-1), self.mask_vec.to(item_vecs.dtype), item_vecs)
        x = torch.cat([self.begin.to(x.dtype).expand(bsz, 1, d), x], dim=1)
        cols = torch.arange(n + 1, device=items.device).unsqueeze(0)
        begin_at = (n - lengths).unsqueeze(1)  # begin sits right before the items
        return x, cols, begin_at, lengths

    def _layout(
        self, item_vecs: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer input ``[B, N+1, d]`` laid out ``[pad.., begin, items..]``, and its
        attention mask ``[B*H, N+1, N+1]`` (True = blocked)."""
        bsz, n, d = item_vecs.shape
        x, cols, begin_at, _ = self._with_begin(item_vecs, items)
        # Column j < begin_at takes a pad, j == begin_at the begin token, after that the items
        # (already in place).
        src = torch.where(cols < begin_at, cols + 1, torch.where(cols == begin_at, 0, cols))
        x = torch.gather(x, 1, src.unsqueeze(-1).expand(bsz, n + 1, d))
        x = self.drop(x + self.pos[-(n + 1) :].to(x.dtype))
        pad = cols < begin_at  # [B, N+1]
        # Causal, no attention to padding; a pad query may see itself so no row is empty.
        blocked = self.causal[-(n + 1) :, -(n + 1) :].unsqueeze(0) | pad.unsqueeze(1)
        blocked = blocked & ~torch.eye(n + 1, dtype=torch.bool, device=items.device)
        return x, blocked.repeat_interleave(self.cfg.num_heads, dim=0)

    def forward_all(
        self, item_vecs: torch.Tensor, items: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """States after the whole history ``[B, d]`` and before each position ``[B, N, d]``.

        ``seq[:, j]`` is the state from the items before history column ``j`` (what predicts
        column ``j``, causally); it is meaningful where column ``j`` holds a real item.
        """
        if self.transformer is not None:
            x, mask = self._layout(item_vecs, items)
            h = self.out_norm(self.transformer(x, mask=mask))
            # layout column c predicts layout column c + 1, which holds history column c
            return h[:, -1], h[:, :-1]
        assert self.gru is not None
        bsz, n, d = item_vecs.shape
        x, cols, begin_at, lengths = self._with_begin(item_vecs, items)
        # Right-aligned layout [begin, items.., pad..] for the GRU; read the state at the end.
        src = torch.where(cols == 0, 0, (cols + begin_at).clamp(max=n))
        x = torch.gather(x, 1, src.unsqueeze(-1).expand(bsz, n + 1, d))
        h, _ = self.gru(self.drop(x))  # recurrence carries order; no position vectors
        h = self.out_norm(h)
        last = h[torch.arange(bsz, device=items.device), lengths]
        # right-aligned column c predicts history column c + (n - length); invert that
        back = (cols[:, :n] - (n - lengths).unsqueeze(1)).clamp(min=0)
        seq = torch.gather(h, 1, back.unsqueeze(-1).expand(bsz, n, d))
        return last, seq


class PolicyNet(nn.Module):
    """Item tower + user encoder + policy head + behaviour head.

    Scoring space (what serving and evaluations use; see the module docstring):

    - ``item_vectors()`` -> ``[I, d+1]``: ``[tower output, T·bias]``
    - ``user_state(items [B, N], item_vecs [I, d+1] | None)`` -> ``[B, d+1]``: ``[state, 1]``
    - ``logits(state [B, d+1], item_vecs [I, d+1])`` -> ``[B, I]``: ``s·v/T + bias``
    - ``behaviour_logits(state, item_vecs)`` -> ``[B, I]``, gradient stopped into state and items
    - ``forward(items [B, N])`` -> ``[B, I]`` policy logits (inference)

    Model space (what training uses, width ``d``): ``item_embeddings()`` ``[I, d]``,
    ``item_biases()`` ``[I]``, ``user_states_all(items, emb)`` -> (``[B, d]``, ``[B, N, d]``),
    ``policy_logits(state, emb, bias)``.
    """

    value_bias: torch.Tensor
    reward_weight: torch.Tensor
    reward_head: RewardHead

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = ItemTower(cfg)
        self.encoder = UserEncoder(cfg)
        self.beta_proj = nn.Linear(cfg.dim, cfg.dim)
        # β starts equal to π (W = I/T, no bias), so early importance ratios π/β are ~1 rather
        # than noise from an untrained head; its own cross-entropy then tracks the logging policy.
        with torch.no_grad():
            self.beta_proj.weight.copy_(torch.eye(cfg.dim) / cfg.policy_temperature)
            self.beta_proj.bias.zero_()
        self.beta_bias = nn.Parameter(torch.zeros(cfg.item_capacity))
        # Policy item bias; always allocated (zero and unused when cfg.item_bias is off, or with
        # no id embedding) so that checkpoints keep one layout. Checkpoints written before it
        # existed load with a zero bias: the same scores as before.
        self.item_bias = nn.Parameter(torch.zeros(cfg.item_capacity))
        # Serving-only value bias (see the module docstring): a buffer, not a parameter; the
        # learner writes it. Checkpoints written before it existed load with zeros.
        self.register_buffer("value_bias", torch.zeros(cfg.item_capacity))
        self.reward_head = RewardHead(cfg.item_capacity, cfg.user_buckets, cfg.dim, cfg.text_dim)
        # Serving weight of the reward head: a buffer the learner writes (0 until it does).
        self.register_buffer("reward_weight", torch.zeros(()))
        self.register_load_state_dict_pre_hook(_default_item_bias)

    @property
    def uses_bias(self) -> bool:
        return self.cfg.item_bias and self.cfg.use_id_embedding

    @property
    def num_items(self) -> int:
        return self.items.n_active

    # --- model space (width d) ---------------------------------------------------------------

    def item_embeddings(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The item tower's output: ``[I, d]``, or ``idx.shape + [d]``."""
        return self.items(idx)

    def item_biases(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Policy bias per item: ``[I]``, or ``idx.shape``; zeros when the bias is off."""
        b = self.item_bias[: self.num_items] if idx is None else self.item_bias[idx]
        return b if self.uses_bias else torch.zeros_like(b)

    def policy_logits(
        self, state: torch.Tensor, emb: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """``s·e/T + b``: ``state [..., d]``, ``emb [I, d]``, ``bias [I]`` -> ``[..., I]``."""
        # Scale the state, not the product, and fuse the bias into the matmul: in training
        # the product is [positions, I], and each extra pass over it costs as much as a matmul.
        q = state / self.cfg.policy_temperature
        if q.dim() == 2:
            return torch.addmm(bias.to(q.dtype), q, emb.T)
        return q @ emb.T + bias.to(q.dtype)

    def _model_space(self, item_vecs: torch.Tensor) -> torch.Tensor:
        """Encoder inputs from item vectors of either width (d, or the scoring d+1)."""
        return item_vecs[..., : self.cfg.dim]

    def user_states_all(
        self, items: torch.Tensor, item_vecs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``items [B, N]`` -> (state ``[B, d]``, per-position states ``[B, N, d]``)."""
        safe = items.clamp(min=0)
        vecs = self.items(safe) if item_vecs is None else self._model_space(item_vecs)[safe]
        return self.encoder.forward_all(vecs, items)

    # --- scoring space (width d+1) --------------------------------------------------------------

    def value_biases(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The serving-only value bias per item: ``[I]``, or ``idx.shape``."""
        return self.value_bias[: self.num_items] if idx is None else self.value_bias[idx]

    def set_value_bias(self, values: torch.Tensor) -> None:
        """Set the value bias of items ``0..len(values)-1`` (the rest keep theirs)."""
        with torch.no_grad():
            self.value_bias[: len(values)].copy_(values.to(self.value_bias))

    def reward_item_factors(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """The reward head's ``q`` of items ``idx`` (or all ``I``), with its text term."""
        text = None
        if self.cfg.use_text:
            vectors = self.items.text_vectors
            text = vectors[: self.num_items] if idx is None else vectors[idx]
        return self.reward_head.item_factors(idx, self.num_items, text)

    def reward_predictions(
        self, users: torch.Tensor, idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``r̂ [B]`` of users ``[B]`` (buckets) for items ``idx [B]``, biases included, and the
        squared norms ``[B]`` of the factors it used (what the learner's L2 weighs)."""
        head = self.reward_head
        p, q = head.user_factors(users), self.reward_item_factors(idx)
        pred = (p * q).sum(-1) + head.item_biases(idx) + head.user_biases(users)
        return pred, p.square().sum(-1) + q.square().sum(-1)

    def set_reward_weight(self, weight: float) -> None:
        """Serving weight of the reward head (0: serving ranks by the policy alone)."""
        self.reward_weight.fill_(float(weight))

    def item_vectors(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Scoring vectors ``[I, 2d+1]`` (or ``idx.shape + [2d+1]``): ``[embedding,
        T·(bias + value bias), T·w·q]``, ``w`` the reward head's serving weight."""
        emb = self.items(idx)
        bias = (self.item_biases(idx) + self.value_biases(idx)).to(emb.dtype)
        t = self.cfg.policy_temperature
        w = self.reward_weight.to(emb.dtype)
        factors = self.reward_item_factors(idx).to(emb.dtype)
        return torch.cat([emb, t * bias.unsqueeze(-1), t * w * factors], dim=-1)

    def user_state(
        self,
        items: torch.Tensor,
        item_vecs: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``items [B, N]`` (PAD/MASK allowed) and the users' buckets ``users [B]``
        (:func:`user_bucket`; -1 or None: unknown) -> scoring state ``[B, 2d+1]``: ``[encoder
        state, 1, the reward head's user factor]``; ``item_vecs`` (any scoring width, or
        ``[I, d]``) reuses precomputed vectors."""
        safe = items.clamp(min=0)
        vecs = self.items(safe) if item_vecs is None else self._model_space(item_vecs)[safe]
        state = self.encoder(vecs, items)
        if users is None:
            users = torch.full(state.shape[:-1], -1, dtype=torch.long, device=state.device)
        taste = self.reward_head.user_factors(users).to(state.dtype)
        return torch.cat([state, state.new_ones((*state.shape[:-1], 1)), taste], dim=-1)

    def logits(self, state: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """Policy logits from scoring-space ``state [B, d+1]`` and ``item_vecs [I, d+1]``."""
        return state @ item_vecs.T / self.cfg.policy_temperature

    def behaviour_logits(self, state: torch.Tensor, item_vecs: torch.Tensor) -> torch.Tensor:
        """β logits ``[B, I]`` from states and item vectors of either width."""
        n = item_vecs.shape[0]
        h = self.beta_proj(self._model_space(state).detach())
        return h @ self._model_space(item_vecs).detach().T + self.beta_bias[:n].to(h.dtype)

    def behaviour_sampled_logits(
        self,
        state: torch.Tensor,
        pos_vecs: torch.Tensor,
        neg_vecs: torch.Tensor,
        pos_ids: torch.Tensor,
        neg_ids: torch.Tensor,
        pos_log_q: torch.Tensor,
        neg_log_q: torch.Tensor,
    ) -> torch.Tensor:
        """Behaviour logits ``[B, 1+S]`` over each row's logged item (column 0) and shared
        negatives, log-Q corrected (see :func:`recsys.objectives.sampled_softmax_logits`);
        gradient stopped into state and items."""
        from recsys.objectives import sampled_softmax_logits

        h = self.beta_proj(self._model_space(state).detach())
        pos_vecs, neg_vecs = self._model_space(pos_vecs), self._model_space(neg_vecs)
        logits = sampled_softmax_logits(
            h, pos_vecs.detach(), neg_vecs.detach(), pos_ids, neg_ids, pos_log_q, neg_log_q
        )
        bias = torch.cat(
            [
                self.beta_bias[pos_ids].unsqueeze(1),
                self.beta_bias[neg_ids].expand(len(pos_ids), -1),
            ],
            dim=1,
        )
        return logits + bias.to(logits.dtype)

    def forward(self, items: torch.Tensor, users: torch.Tensor | None = None) -> torch.Tensor:
        vecs = self.item_vectors()
        return self.logits(self.user_state(items, vecs, users), vecs)

    # --- item capacity ----------------------------------------------------------------------

    def set_text_vectors(self, vectors: torch.Tensor, start: int = 0) -> None:
        """Copy ``vectors [n, D]`` into rows ``start..start+n`` and raise ``I`` to cover them."""
        end = start + vectors.shape[0]
        if end > self.items.capacity:
            raise ConfigError(
                f"item index {end - 1} exceeds item_capacity {self.items.capacity}; "
                "call grow() first"
            )
        with torch.no_grad():
            self.items.text_vectors[start:end].copy_(vectors)
            self.set_num_items(max(self.items.n_active, end))

    def set_num_items(self, n: int) -> None:
        if n > self.items.capacity:
            raise ConfigError(f"num_items {n} exceeds item_capacity {self.items.capacity}")
        self.items.num_items.fill_(n)
        self.items.n_active = n

    def grow(self, capacity: int) -> dict[torch.Tensor, torch.Tensor]:
        """Reallocate item rows to ``capacity``; returns {old param: new param} for optimizers.

        New id-embedding rows are initialised like the first ones; the behaviour bias with 0.
        """
        old_cap = self.items.capacity
        if capacity <= old_cap:
            return {}
        dev = self.items.text_vectors.device
        text = torch.zeros(capacity, self.cfg.text_dim, device=dev)
        text[:old_cap] = self.items.text_vectors
        self.items.text_vectors = text
        mapping: dict[torch.Tensor, torch.Tensor] = {}
        for name in ("beta_bias", "item_bias"):
            old_bias = getattr(self, name)
            new_bias = nn.Parameter(F.pad(old_bias.detach(), (0, capacity - old_cap)))
            setattr(self, name, new_bias)
            mapping[old_bias] = new_bias
        self.value_bias = F.pad(self.value_bias, (0, capacity - old_cap))
        mapping.update(self.reward_head.grow(capacity))
        if self.items.id_embedding is not None:
            old_w = self.items.id_embedding.weight
            extra = torch.randn(capacity - old_cap, self.cfg.dim, device=dev) * 0.02
            new_emb = nn.Embedding(capacity, self.cfg.dim, device=dev)
            with torch.no_grad():
                new_emb.weight.copy_(torch.cat([old_w.detach(), extra.to(old_w.dtype)]))
            self.items.id_embedding = new_emb
            mapping[old_w] = new_emb.weight
        self.cfg = _replace_capacity(self.cfg, capacity)
        self.items.cfg = self.cfg
        self.encoder.cfg = self.cfg
        return mapping


def user_bucket(user_id: str, buckets: int) -> int:
    """The reward head's row for ``user_id``: a stable hash (the same in every process, unlike
    ``hash``) modulo ``buckets``."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


def user_buckets(
    user_ids: Sequence[str], buckets: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """:func:`user_bucket` of each id -> ``[B]`` long tensor."""
    return torch.tensor(
        [user_bucket(u, buckets) for u in user_ids], dtype=torch.long, device=device
    )


class RewardHead(nn.Module):
    """A personalised pointwise reward model: ``r̂(u, i) = p_u·q_i + c_i + a_u``.

    ``p_u`` is row :func:`user_bucket` of a fixed table (bounded whatever the number of users;
    ids that share a bucket share a factor); ``q_i = q^id_i + A·text_i`` and ``c_i`` the item's
    factors and bias. The text term (``A`` starts at zero) is what a new item, whose id row has
    not been trained, is ranked by.
    The tables are the head's own, not the policy's item embeddings: those learn what a user
    engages with next, these how well it pays (in MovieLens the two disagree: ranking by
    next-watch probability is below ranking by mean rating). ``p`` starts at zero, so an
    untrained head, or an unknown user (bucket -1), gets ``c_i`` alone. The biases help the
    fit; serving uses only ``p_u·q_i`` (``a_u``, how generously the user rates, is the same
    for all of a user's items, and ``c_i`` is what the counted value bias already serves).

    The tables are stored divided by :attr:`SCALE` and used multiplied by it: Adam moves a
    parameter by about ``lr`` per step whatever its gradient, and a factor row, which has a
    gradient only when its user or item is in the batch, needs larger steps than the network's
    weights (a per-table learning rate without a second optimizer group).

    ``user_factors(users [B])`` -> ``[B, d]``; ``item_factors(idx, n, text [.., D])`` -> ``[.., d]``
    (:meth:`PolicyNet.reward_predictions` puts them together).
    """

    SCALE = 10.0

    def __init__(self, capacity: int, buckets: int, dim: int, text_dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.text_proj = nn.Linear(text_dim, dim, bias=False)
        nn.init.zeros_(self.text_proj.weight)
        self.users = nn.Parameter(torch.zeros(buckets, dim))
        self.items = nn.Parameter(torch.randn(capacity, dim) * (0.1 / self.SCALE))
        self.bias = nn.Parameter(torch.zeros(capacity))
        self.user_bias = nn.Parameter(torch.zeros(buckets))

    def user_factors(self, users: torch.Tensor) -> torch.Tensor:
        known = (users >= 0).unsqueeze(-1)
        return self.SCALE * self.users[users.clamp(min=0)] * known

    def item_factors(
        self,
        idx: torch.Tensor | None = None,
        n: int | None = None,
        text: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``q`` of items ``idx`` (``idx.shape + [d]``), or of the first ``n`` (``[n, d]``);
        ``text`` their text vectors (None: the id term alone)."""
        q = self.SCALE * (self.items[:n] if idx is None else self.items[idx])
        return q if text is None else q + self.text_proj(text.to(q.dtype))

    def item_biases(self, idx: torch.Tensor | None = None, n: int | None = None) -> torch.Tensor:
        """``c`` of items ``idx``, or of the first ``n``."""
        return self.SCALE * (self.bias[:n] if idx is None else self.bias[idx])

    def user_biases(self, users: torch.Tensor) -> torch.Tensor:
        """``a_u`` of ``users`` (0 for -1)."""
        return self.SCALE * self.user_bias[users.clamp(min=0)] * (users >= 0)

    def grow(self, capacity: int) -> dict[torch.Tensor, torch.Tensor]:
        """Reallocate the item rows to ``capacity`` (new ones: small random factors, zero
        bias); returns {old param: new param} for the optimizer."""
        extra = capacity - self.items.shape[0]
        if extra <= 0:
            return {}
        dev = self.items.device
        new_rows = torch.randn(extra, self.dim, device=dev) * (0.1 / self.SCALE)
        grown = {
            "items": torch.cat([self.items.detach(), new_rows.to(self.items.dtype)]),
            "bias": F.pad(self.bias.detach(), (0, extra)),
        }
        mapping: dict[torch.Tensor, torch.Tensor] = {}
        for name, value in grown.items():
            old, new = getattr(self, name), nn.Parameter(value)
            setattr(self, name, new)
            mapping[old] = new
        return mapping


def _default_item_bias(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Checkpoints from before the item bias or the value bias load with zero ones, and from
    before the reward head with a fresh head and a zero serving weight (unchanged scores)."""
    beta = state_dict.get(prefix + "beta_bias")
    if beta is None:
        return
    for name in ("item_bias", "value_bias"):
        state_dict.setdefault(prefix + name, torch.zeros_like(beta))
    head = getattr(module, "reward_head", None)
    if isinstance(head, RewardHead) and prefix + "reward_head.items" not in state_dict:
        text_dim = head.text_proj.weight.shape[1]
        fresh = RewardHead(len(beta), head.users.shape[0], head.dim, text_dim).to(beta.device)
        for name, value in fresh.state_dict().items():
            state_dict[f"{prefix}reward_head.{name}"] = value
    state_dict.setdefault(prefix + "reward_weight", beta.new_zeros(()))


def _replace_capacity(cfg: ModelConfig, capacity: int) -> ModelConfig:
    d = cfg.to_dict()
    d["item_capacity"] = capacity
    return ModelConfig(**d)
