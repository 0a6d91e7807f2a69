"""The incremental learner: reward records in, gradient steps, atomic checkpoints out. No Kafka.

Typical use (the learner worker wraps exactly this around a consumer)::

    learner = Learner(ModelConfig(...), LearnerConfig(...))      # or load_latest_checkpoint(dir)
    learner.observe(records)          # list[RewardRecord]: histories + replay buffer
    metrics = learner.step()          # one gradient step, or None while the buffer is empty
    learner.save_checkpoint(dir, offsets={"recsys.rewards:0": 1234})

Each step minimises ``f·sequence_weight·L_seq + (1−f)·pg_weight·L_PG + α·L_contrast
(+ behaviour_weight·L_β)`` (see :mod:`recsys.objectives`), ``f`` the share of softmax rows that
are history positions (so every row weighs the same). All softmaxes are over the **allowed set**
when ``mask_history`` (the items the user has already engaged are masked, as the publisher
excludes them from slates), with the policy logits ``s·v/T + b`` (item bias ``b``); full softmax,
or above ``sampled_above`` items a sampled softmax over ``num_negatives`` shared uniform
negatives with the log-Q correction (seen negatives masked too):

- ``L_seq``: cross-entropy at every real position of every history: the causal state before
  position ``j`` predicts the item at ``j`` (SASRec's objective; the history holds positives).
- ``L_PG``: the logged item at the state after the history: REINFORCE with advantage
  ``A = R − mean_batch(R)`` (``impression_baseline``; an impression shown and ignored, R = 0,
  moves probability away from its item) in the bounded form of
  :func:`recsys.objectives.advantage_loss`, weighted by the top-K off-policy correction
  ``min(π/β, weight_cap)·K(1−π)^(K−1)`` where a propensity β was logged
  (``off_policy_correction``; π over the same allowed set as β) and 1 where it was not (organic
  feedback has no logging policy to correct for). Weights are divided by their batch mean
  (``normalize_weights``). ``objective="ce"`` uses plain cross-entropy on the positive logged
  items instead.
- ``L_contrast`` (``contrastive="infonce"``): InfoNCE on cosine similarity over
  ``contrast_temperature`` between two views of each of the first ``augment_rows`` histories
  (two CL4SRec augmentations with ``augment_views=2``; dropout views with 1), rows with the same
  next item or the same last item masked as false negatives. ``"hinge"``: the seed's cosine
  hinge.
- ``L_β`` (``behaviour_weight`` > 0; off by default): the behaviour head's own cross-entropy,
  gradient stopped into the state; a diagnostic estimate of the logging policy, not used by
  ``L_PG``.

Steps run under bf16 autocast on CUDA (``amp``); a non-finite loss or gradient skips the update
and is counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from recsys import checkpoint as ckpt
from recsys import metrics
from recsys import objectives as obj
from recsys.encoder.catalog import ItemCatalog
from recsys.errors import CheckpointError, ConfigError
from recsys.events import RewardRecord
from recsys.history import UserHistories, impression_key, pad_histories
from recsys.learner.checkpoint_io import optimizer_from_flat, optimizer_to_flat, write_json
from recsys.learner.config import LearnerConfig
from recsys.learner.item_value import ItemValues
from recsys.learner.reward_refit import refit_reward_head
from recsys.model import ModelConfig, PolicyNet, user_bucket, user_buckets
from recsys.replay_buffer import ReplayBuffer, Transitions
from recsys.serving.device import resolve_device
from recsys.serving.model import policy_scores

log = logging.getLogger(__name__)

HISTORY_CACHE = "learner_histories"
"""The ``cache`` label of the learner's user histories in the ``recsys_cache_*`` gauges."""
ITEM_TABLE = "learner_items"
"""The ``cache`` label of the learner's item tables (entries: item ids held; never evicted)."""

LOSS_NAMES = ("loss", "sequence", "pg", "contrast", "behaviour", "reward", "weight_mean")


class Learner:
    """Owns the model, optimizer, item catalogue, user histories and replay buffer."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: LearnerConfig | None = None,
        catalog: ItemCatalog | None = None,
    ) -> None:
        self.cfg = cfg = cfg or LearnerConfig()
        self.device = resolve_device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.catalog = catalog if catalog is not None else ItemCatalog(dim=model_cfg.text_dim)
        if self.catalog.dim != model_cfg.text_dim:
            raise ConfigError(
                f"ModelConfig.text_dim={model_cfg.text_dim} but the catalogue's vectors have "
                f"{self.catalog.dim} dimensions"
            )
        self.model = PolicyNet(model_cfg).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        # Bounded by users, not only by entries per user: every user ever seen would otherwise
        # stay resident and in every checkpoint. An evicted user's samples already in the
        # buffer keep their state; only that user's later events start from an empty history.
        self.histories = UserHistories(
            model_cfg.max_history, max_users=cfg.max_users, name=HISTORY_CACHE
        )
        self.items_refused = 0  # rewards dropped because their new item found no room
        self.buffer = ReplayBuffer(
            cfg.buffer_capacity,
            model_cfg.max_history,
            recent_capacity=cfg.recent_capacity,
            recent_fraction=cfg.recent_fraction,
            device=self.device,
            seed=cfg.seed,
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(cfg.seed + 1)
        self.step_count = 0
        # logged actions per item (the proposal Q of in-batch negatives), grown with the catalogue
        self.item_counts = torch.zeros(model_cfg.item_capacity, device=self.device)
        # Counted reward statistics per item -> the model's serving-only value bias.
        self.values = ItemValues(cfg.organic_value_prior, cfg.click_value_prior)
        self._synced_version = -1
        self._amp = cfg.amp and self.device.type == "cuda"
        metrics.REPLAY_BUFFER_CAPACITY.set(cfg.buffer_capacity)
        self._item_gauges()

    @property
    def model_cfg(self) -> ModelConfig:
        return self.model.cfg

    # --- memory bounds ----------------------------------------------------------------------

    def admits(self, item_id: str) -> bool:
        """Whether a record for ``item_id`` fits: a known item, or room for one more.

        Item tables are never compacted (an index is a row of the model and of every sample in
        the buffer), so ``max_items`` is a hard bound: beyond it new ids are refused.
        """
        return item_id in self.catalog or len(self.catalog) < self.cfg.max_items

    def admit_batch(self, item_ids: Sequence[str]) -> list[bool]:
        """:meth:`admits` for each id of a batch, counting the batch's own new ids."""
        room = self.cfg.max_items - len(self.catalog)
        new: set[str] = set()
        out = []
        for item in item_ids:
            ok = item in self.catalog or item in new or len(new) < room
            if ok and item not in self.catalog:
                new.add(item)
            out.append(ok)
        return out

    def set_memory_bounds(self, max_users: int, max_items: int) -> None:
        """Apply new bounds (e.g. the worker's settings over a checkpoint's config).

        Fewer users than held: the least recently active are dropped now. Fewer items than
        held: the items stay (indices cannot be reclaimed) and new ones are refused.
        """
        self.cfg = dataclasses.replace(self.cfg, max_users=max_users, max_items=max_items)
        if max_users != self.histories.max_users:
            users, arrays = self.histories.to_arrays()
            self.histories = UserHistories.from_arrays(
                users,
                arrays,
                self.histories.max_len,
                self.histories.retain,
                max_users=max_users,
                name=HISTORY_CACHE,
            )
        self._item_gauges()

    def _item_gauges(self) -> None:
        metrics.CACHE_ENTRIES.labels(cache=ITEM_TABLE).set(len(self.catalog))
        metrics.CACHE_CAPACITY.labels(cache=ITEM_TABLE).set(self.cfg.max_items)

    def _item_rows(self, n: int, have: int) -> int:
        """Rows to allocate for ``n`` items: doubling from ``have``, never past the bound."""
        rows = max(have, 1)
        while rows < n:
            rows *= 2
        return max(n, min(rows, self.cfg.max_items))

    # --- data in ----------------------------------------------------------------------------

    def observe(self, records: Sequence[RewardRecord]) -> int:
        """Update histories and buffer from reward records; returns how many were buffered.

        Each sample's state is the user's history as of the record's ``ts`` (strictly earlier
        positives), taken before the record itself is added: no leakage. Records with a
        non-finite reward are dropped, and so are records of a new item once the item tables
        hold ``max_items`` (counted in :attr:`items_refused`; the worker's sink dead-letters
        them before they get here, see :meth:`admits`).
        """
        hist, items, rewards, props, positions, keys, users = [], [], [], [], [], [], []
        buckets = self.model_cfg.user_buckets
        for r in records:
            if not math.isfinite(r.reward):
                log.warning("dropping reward %s with non-finite reward", r.reward_id)
                continue
            if not self.admits(r.item_id):
                self.items_refused += 1
                log.warning(
                    "dropping reward %s: item tables full (max_items=%d)",
                    r.reward_id,
                    self.cfg.max_items,
                )
                continue
            i = self.catalog.index_of(r.item_id)
            hist.append(self.histories.as_of(r.user_id, r.ts))
            key = impression_key(r.request_id, r.item_id)  # one entry per engaged impression
            self.histories.add(r.user_id, i, r.ts, r.reward, key)
            items.append(i)
            rewards.append(r.reward)
            props.append(math.nan if r.propensity is None else r.propensity)
            positions.append(-1 if r.position is None else r.position)
            keys.append(key)
            users.append(user_bucket(r.user_id, buckets))
        self._item_gauges()
        if not items:
            return 0
        self.values.update(items, rewards, positions, keys)
        idx = torch.tensor(items, device=self.device)
        have = self.item_counts.shape[0]
        if len(self.catalog) > have:
            self.item_counts = F.pad(
                self.item_counts, (0, self._item_rows(len(self.catalog), have) - have)
            )
        self.item_counts.index_add_(0, idx, torch.ones(len(items), device=self.device))
        h, _ = pad_histories(hist, self.model_cfg.max_history)
        self.buffer.add(
            Transitions(
                history=h,
                item=torch.tensor(items),
                reward=torch.tensor(rewards, dtype=torch.float32),
                propensity=torch.tensor(props, dtype=torch.float32),
                position=torch.tensor(positions),
                user=torch.tensor(users),
            )
        )
        metrics.REPLAY_BUFFER_SIZE.set(len(self.buffer))
        return len(items)

    def sync_items(self) -> None:
        """Bring the model's item rows up to the catalogue (new items, changed vectors)."""
        if self.catalog.version == self._synced_version:
            return
        n = len(self.catalog)
        cap = self.model.items.capacity
        if n > cap:
            self._replace_params(self.model.grow(self._item_rows(n, cap)))
        self._item_gauges()
        if n:
            self.model.set_text_vectors(self.catalog.text_vectors(self.device))
        self._synced_version = self.catalog.version

    def sync_values(self) -> None:
        """Write the serving-only terms into the model: the counted value bias and the reward
        head's weight."""
        self.sync_items()
        head_on = self.cfg.reward_head_weight > 0
        self.model.set_reward_weight(self.cfg.reward_serving_weight if head_on else 0.0)
        n = self.model.num_items
        if n == 0 or len(self.values) == 0:
            return
        cfg = self.cfg
        bias = self.values.bias(
            n, cfg.organic_value_weight, cfg.click_value_weight, cfg.click_value_optimism
        )
        self.model.set_value_bias(torch.from_numpy(bias))

    def _replace_params(self, mapping: dict[torch.Tensor, torch.Tensor]) -> None:
        """Point the optimizer at grown parameters, padding their state with zeros."""
        opt = self.optimizer
        for group in opt.param_groups:
            group["params"] = [mapping.get(p, p) for p in group["params"]]
        for old, new in mapping.items():
            state = opt.state.pop(old, None)
            if state is None:
                continue
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == old.shape:
                    pad = [0, 0] * (v.dim() - 1) + [0, new.shape[0] - old.shape[0]]
                    state[k] = F.pad(v, pad)
            opt.state[new] = state

    # --- learning ---------------------------------------------------------------------------

    def use_sampled_softmax(self) -> bool:
        if self.cfg.softmax == "auto":
            return self.model.num_items > self.cfg.sampled_above
        return self.cfg.softmax == "sampled"

    def losses(
        self, batch: Transitions, reward_batch: Transitions | None = None
    ) -> dict[str, torch.Tensor]:
        """All loss terms of one batch (differentiable ``loss``; the rest for reporting).

        Rows of the softmax: every real position of every history (the causal state before it
        predicts its item: the sequence term) and the state after each history (it predicts
        the logged item: the policy-gradient term), all in one ``[R, I]`` product. The reward
        head fits ``reward_batch`` (None: ``batch``); it reads only its users, items and
        rewards.
        """
        cfg, model = self.cfg, self.model
        hist = batch.history.long()
        actions, rewards = batch.item.long(), batch.reward.float()
        bsz, n = hist.shape
        positive = (rewards > 0).float()
        n_items = model.num_items
        sampled = self.use_sampled_softmax()
        neg_ids = None
        if sampled:
            # uniform negatives shared by the batch; log-Q term log(S·q) = log(S / I)
            num = cfg.num_negatives
            neg_ids, _ = obj.sample_negatives(n_items, num, self.generator, device=self.device)
            emb = self._needed_embeddings(torch.cat([hist.reshape(-1), actions, neg_ids]))
        else:
            emb = model.item_embeddings()  # [I, d]
        state, seq = model.user_states_all(hist, emb)  # [B, d], [B, N, d]
        seq_on = cfg.sequence_weight > 0
        if seq_on:
            b_idx, j_idx = (hist >= 0).nonzero(as_tuple=True)  # real history positions
        else:
            b_idx = j_idx = hist.new_zeros(0)
        n_seq = int(b_idx.numel())
        rows_b = torch.cat([b_idx, torch.arange(bsz, device=hist.device)])
        queries = torch.cat([seq[b_idx, j_idx], state])  # [R, d], R = n_seq + B
        targets = torch.cat([hist[b_idx, j_idx], actions])
        if neg_ids is not None:
            num = len(neg_ids)
            neg_lq = torch.full((num,), math.log(num / n_items), device=self.device)
            pos_e, neg_e = emb[targets], emb[neg_ids]
            logits = obj.sampled_softmax_logits(
                queries,
                pos_e,
                neg_e,
                targets,
                neg_ids,
                torch.zeros_like(targets, dtype=torch.float32) - model.item_biases(targets),
                neg_lq - model.item_biases(neg_ids),
                model.cfg.policy_temperature,
            )
            if cfg.mask_history:
                upto = torch.cat([j_idx, torch.full((bsz,), n, device=hist.device)])
                logits = obj.mask_seen_sampled(logits, hist, rows_b, upto, neg_ids)
            ce = F.cross_entropy(logits.float(), torch.zeros_like(targets), reduction="none")
        else:
            logits = model.policy_logits(queries, emb, model.item_biases()).float()
            if cfg.mask_history:
                upto = torch.cat([j_idx, torch.full((bsz,), n, device=hist.device)])
                logits = obj.mask_seen(logits, hist[rows_b], upto, targets)
            ce = F.cross_entropy(logits, targets, reduction="none")  # −log π, [R]
        seq_loss = ce[:n_seq].mean() if n_seq else ce.new_zeros(())
        log_pi_a = -ce[n_seq:]  # [B], log π(a|u) over the allowed set
        if cfg.objective == "reinforce":
            w = obj.correction_weights(
                log_pi_a.detach().exp(),
                batch.propensity,
                cfg.topk,
                cfg.weight_cap,
                cfg.off_policy_correction,
            )
            w_mean = w.mean()
            if cfg.normalize_weights:
                w = w / w_mean.clamp(min=1e-12)
            adv = obj.advantage(rewards, cfg.impression_baseline)
            pg = obj.advantage_loss(log_pi_a, adv, w)
        else:
            pg = -(log_pi_a * positive).sum() / positive.sum().clamp(min=1.0)
            w_mean = torch.ones((), device=self.device)
        behaviour = torch.zeros((), device=self.device)
        if cfg.behaviour_weight > 0:
            behaviour = self._behaviour_loss(state, actions, emb)
        reward = torch.zeros((), device=self.device)
        if cfg.reward_head_weight > 0:
            rb = batch if reward_batch is None else reward_batch
            reward = self._reward_loss(rb.users, rb.item.long(), rb.reward.float(), rb.propensity)
        contrast = torch.zeros((), device=self.device)
        if cfg.contrastive != "none" and cfg.alpha > 0:
            if cfg.contrastive == "infonce":
                contrast = self._view_nce(hist, actions, emb)
            else:
                pos_e = emb[actions]
                contrast = obj.cosine_hinge(state, pos_e, pos_e.roll(1, 0), cfg.hinge_margin)
        # Each softmax row weighs the same: the after-history row is one position among the
        # history's (weighting the means 1:1 would give it ~N times a history position's weight
        # and overfit the windows' last items).
        f_seq = n_seq / (n_seq + bsz)
        loss = (
            cfg.sequence_weight * f_seq * seq_loss
            + cfg.pg_weight * (1.0 - f_seq) * pg
            + cfg.alpha * contrast
            + cfg.behaviour_weight * behaviour
            + cfg.reward_head_weight * reward
        )
        return {
            "loss": loss,
            "sequence": seq_loss,
            "pg": pg,
            "contrast": contrast,
            "behaviour": behaviour,
            "reward": reward,
            "weight_mean": w_mean,
        }

    def _needed_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """``[I, d]`` item embeddings with only the rows of ``ids`` computed (zeros elsewhere):
        with a sampled softmax a step needs the batch's items and the negatives, not all."""
        uniq = ids[ids >= 0].unique()
        rows = self.model.item_embeddings(uniq)
        full = rows.new_zeros((self.model.num_items, rows.shape[-1]))
        return full.index_put((uniq,), rows)

    def _behaviour_loss(
        self, state: torch.Tensor, actions: torch.Tensor, emb: torch.Tensor
    ) -> torch.Tensor:
        """The behaviour head's own cross-entropy on the logged items (gradient stopped into
        the state and items): exact up to ``behaviour_negatives`` items, sampled above."""
        model, n_items = self.model, self.model.num_items
        if not self.use_sampled_softmax() and n_items <= self.cfg.behaviour_negatives:
            return obj.behaviour_loss(model.behaviour_logits(state, emb), actions)
        num = self.cfg.behaviour_negatives
        neg_ids, _ = obj.sample_negatives(n_items, num, self.generator, device=self.device)
        neg_lq = torch.full((num,), math.log(num / n_items), device=self.device)
        pos_e, neg_e = model.item_embeddings(actions), model.item_embeddings(neg_ids)
        zero_lq = torch.zeros(len(actions), device=self.device)
        logits = model.behaviour_sampled_logits(
            state, pos_e, neg_e, actions, neg_ids, zero_lq, neg_lq
        )
        return obj.behaviour_loss(logits, torch.zeros_like(actions))

    def _reward_weights(self, logged: torch.Tensor) -> torch.Tensor:
        """Each row's weight in the head's fit: ``reward_impression_weight`` where a
        propensity was logged, 1 for organic feedback."""
        return torch.where(logged, float(self.cfg.reward_impression_weight), 1.0)

    def _reward_loss(
        self,
        users: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        propensity: torch.Tensor,
    ) -> torch.Tensor:
        """The reward head's squared error on the logged rewards, plus ``reward_l2`` times the
        squared norms of the factors it used (per-row L2, as in matrix factorisation: rows
        with few records stay near zero instead of fitting their noise); rows weighted by
        :meth:`_reward_weights`, 0 when every row weighs 0."""
        pred, norms = self.model.reward_predictions(users, actions)
        w = self._reward_weights(torch.isfinite(propensity))
        per_row = (pred.float() - rewards).square() + self.cfg.reward_l2 * norms.float()
        return (w * per_row).sum() / w.sum().clamp(min=1e-12)

    def _view_nce(
        self, hist: torch.Tensor, actions: torch.Tensor, emb: torch.Tensor
    ) -> torch.Tensor:
        """InfoNCE (cosine / ``contrast_temperature``) between two views of each history.

        Views: two CL4SRec augmentations (crop / mask / reorder) of the first ``augment_rows``
        histories with ``augment_views=2``; with 1, the history itself encoded twice (dropout
        makes the views differ, DuoRec's unsupervised view). False negatives masked: rows with
        the same next item or the same last history item (a user's neighbouring samples).
        """
        cfg, model = self.cfg, self.model
        rows = hist[: cfg.augment_rows]
        if cfg.augment_views == 2:
            v1, v2 = obj.augment(rows, self.generator), obj.augment(rows, self.generator)
        else:
            v1 = v2 = rows
        z1 = model.user_states_all(v1, emb)[0]
        z2 = model.user_states_all(v2, emb)[0]
        same = obj.false_negative_pairs(actions[: cfg.augment_rows], rows[:, -1])
        return obj.nt_xent(z1, z2, cfg.contrast_temperature, same)

    def step(self) -> dict[str, float] | None:
        """One gradient step on a sampled batch; ``None`` while the buffer holds too little.

        A non-finite loss or gradient skips the update (counted in
        ``recsys_learner_skipped_steps_total``); the returned dict then has ``skipped=1``.
        """
        if len(self.buffer) < self.cfg.min_buffer or len(self.buffer) == 0:
            return None
        self.sync_items()
        if self.model.num_items == 0:
            return None
        self.model.train()
        batch = self.buffer.sample(self.cfg.batch_size)
        reward_batch = None
        if self.cfg.reward_head_weight > 0 and self.cfg.reward_batch_multiplier > 1:
            reward_batch = self.buffer.sample(
                self.cfg.batch_size * self.cfg.reward_batch_multiplier
            )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._amp):
            terms = self.losses(batch, reward_batch)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        values = torch.stack([terms[k].detach().float() for k in LOSS_NAMES] + [grad_norm.float()])
        out = dict(zip((*LOSS_NAMES, "grad_norm"), values.tolist(), strict=True))  # one sync
        if not all(math.isfinite(v) for v in out.values()):
            self.optimizer.zero_grad(set_to_none=True)
            metrics.LEARNER_SKIPPED_STEPS.inc()
            log.warning("skipping step %d: non-finite loss or gradient %s", self.step_count, out)
            out["skipped"] = 1.0
            return out
        self.optimizer.step()
        self.step_count += 1
        every = self.cfg.reward_refit_every
        if every and self.cfg.reward_head_weight > 0 and self.step_count % every == 0:
            self.refit_reward_head()
        metrics.LEARNER_STEPS.inc()
        metrics.LEARNER_SAMPLES.inc(len(batch))
        for k in ("loss", "pg", "contrast", "behaviour", "reward"):
            metrics.LEARNER_LOSS.labels(loss=k).set(out[k])
        out["skipped"] = 0.0
        return out

    def refit_reward_head(self) -> None:
        """``reward_refit_sweeps`` exact alternating least-squares sweeps of the reward head
        over every row the replay buffer holds (:mod:`recsys.learner.reward_refit`): the
        minimum of the head's own loss, which gradient steps approach slowly."""
        if len(self.buffer) == 0 or self.model.num_items == 0:
            return
        with metrics.LEARNER_REFIT_SECONDS.time():
            rows = self.buffer.reward_rows()
            refit_reward_head(
                self.model,
                rows.user,
                rows.item,
                rows.reward,
                rows.weight * self._reward_weights(rows.logged),
                self.cfg.reward_l2,
                self.cfg.reward_refit_sweeps,
            )

    # --- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def scores(
        self,
        user_histories: Sequence[Sequence[int]] | torch.Tensor,
        user_ids: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Serving scores ``[B, I]`` (float32) for histories (item-index lists or ``[B, N]``)
        and, when given, the users' ids (the reward head's user factors)."""
        self.sync_values()
        users = None
        if user_ids is not None:
            users = user_buckets(user_ids, self.model_cfg.user_buckets, self.device)
        return policy_scores(self.model, user_histories, users)

    # --- checkpoints ------------------------------------------------------------------------

    def save_checkpoint(
        self, root: str | Path, offsets: dict[str, int], extra: dict[str, Any] | None = None
    ) -> Path:
        """Write an atomic checkpoint ``<root>/v<step:012d>`` (see :mod:`recsys.checkpoint`).

        Raises CheckpointError (and writes nothing) if any weight is not finite.
        """
        self.sync_values()
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"refusing to save non-finite weights: {bad}")
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer, self.model)
        users, hist = self.histories.to_arrays()
        hist_t = {k: torch.from_numpy(v) for k, v in hist.items()}
        cat_arrays, cat_meta = self.catalog.state()
        del cat_arrays  # the vectors are the model's text_vectors rows
        writers: dict[str, Any] = {
            "model.safetensors": lambda p: save_file(state, str(p)),
            "optimizer.safetensors": lambda p: save_file(opt_tensors, str(p)),
            "optimizer.json": lambda p: write_json(p, opt_meta),
            "catalog.json": lambda p: write_json(p, cat_meta),
            "learner.safetensors": lambda p: save_file(
                {"item_counts": self.item_counts.detach().cpu().contiguous()}
                | {
                    f"values.{k}": torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in self.values.state().items()
                },
                str(p),
            ),
            "histories.safetensors": lambda p: save_file(hist_t, str(p)),
            "histories.json": lambda p: write_json(
                p,
                {
                    "users": users,
                    "max_len": self.histories.max_len,
                    "retain": self.histories.retain,
                },
            ),
        }
        if self.cfg.checkpoint_buffer:
            rb_tensors, rb_meta = self.buffer.state_dict()
            writers["replay.safetensors"] = lambda p: save_file(rb_tensors, str(p))
            writers["replay.json"] = lambda p: write_json(p, rb_meta)
        manifest = {
            "offsets": {str(k): int(v) for k, v in offsets.items()},
            "config": {"model": self.model_cfg.to_dict(), "learner": self.cfg.to_dict()},
            "encoder": self.catalog.encoder.name if self.catalog.encoder is not None else None,
            "num_items": self.model.num_items,
            "extra": extra or {},
        }
        path = ckpt.write_checkpoint(root, self.step_count, writers, manifest)
        ckpt.prune(root, self.cfg.keep_checkpoints)
        metrics.CHECKPOINTS_WRITTEN.inc()
        metrics.CHECKPOINT_TIMESTAMP.set_to_current_time()
        return path

    @classmethod
    def load_checkpoint(
        cls,
        path: str | Path,
        catalog: ItemCatalog | None = None,
        device: str | None = None,
    ) -> tuple[Learner, dict[str, Any]]:
        """Restore a learner from checkpoint ``path`` -> ``(learner, manifest)``.

        ``catalog``: an empty catalogue to restore into (e.g. one with a text encoder); default
        an id-only one. ``device`` overrides the saved ``LearnerConfig.device``.
        """
        path = Path(path)
        manifest = ckpt.read_manifest(path)
        try:
            model_cfg = ModelConfig.from_dict(manifest["config"]["model"])
            lcfg = manifest["config"]["learner"]
            if device is not None:
                lcfg = {**lcfg, "device": device}
            learner = cls(model_cfg, LearnerConfig.from_dict(lcfg), catalog)
            learner.model.load_state_dict(
                load_file(str(ckpt.checkpoint_file(path, manifest, "model.safetensors")))
            )
            optimizer_from_flat(
                learner.optimizer,
                learner.model,
                load_file(str(ckpt.checkpoint_file(path, manifest, "optimizer.safetensors"))),
                json.loads(ckpt.checkpoint_file(path, manifest, "optimizer.json").read_text()),
            )
            extra = load_file(str(ckpt.checkpoint_file(path, manifest, "learner.safetensors")))
            learner.item_counts = extra["item_counts"].to(learner.device)
            # Checkpoints from before the value statistics restore with none (zero bias).
            learner.values.load_state(
                {
                    k[len("values.") :]: v.numpy()
                    for k, v in extra.items()
                    if k.startswith("values.")
                }
            )
            cat_meta = json.loads(ckpt.checkpoint_file(path, manifest, "catalog.json").read_text())
            n = len(cat_meta["ids"])
            vecs = learner.model.items.text_vectors[:n].cpu().numpy()
            learner.catalog.load_state({"vectors": vecs}, cat_meta)
            learner._synced_version = learner.catalog.version
            hmeta = json.loads(ckpt.checkpoint_file(path, manifest, "histories.json").read_text())
            harr = {
                k: v.numpy()
                for k, v in load_file(
                    str(ckpt.checkpoint_file(path, manifest, "histories.safetensors"))
                ).items()
            }
            learner.histories = UserHistories.from_arrays(
                hmeta["users"],
                harr,
                hmeta["max_len"],
                hmeta["retain"],
                max_users=learner.cfg.max_users,
                name=HISTORY_CACHE,
            )
            if "replay.safetensors" in manifest["files"]:
                learner.buffer.load_state_dict(
                    load_file(str(ckpt.checkpoint_file(path, manifest, "replay.safetensors"))),
                    json.loads(ckpt.checkpoint_file(path, manifest, "replay.json").read_text()),
                )
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot restore learner: {exc}") from exc
        learner.step_count = int(manifest["step"])
        return learner, manifest

    @classmethod
    def load_latest_checkpoint(
        cls,
        root: str | Path,
        catalog_factory: Any = None,
        device: str | None = None,
    ) -> tuple[Learner, dict[str, int]] | None:
        """Resume from the newest valid checkpoint under ``root`` -> ``(learner, offsets)``.

        Partial, corrupt or tampered checkpoints are skipped (logged); ``None`` when no valid
        one exists. ``catalog_factory()`` makes the empty catalogue to restore into.
        """
        for p in ckpt.list_checkpoints(root):
            try:
                catalog = catalog_factory() if catalog_factory is not None else None
                learner, manifest = cls.load_checkpoint(p, catalog, device)
            except CheckpointError as exc:
                log.warning("skipping checkpoint: %s", exc)
                continue
            return learner, dict(manifest["offsets"])
        return None
