"""Model loading for inference: a checkpoint's policy network, ready to rank.

- :func:`load_policy` loads a verified checkpoint's network and item ids (eval mode).
- :func:`policy_scores` gives policy logits for histories (evaluations use it).
- :class:`ServingModel` binds a loaded network to a :class:`~recsys.policy.Policy`; it is what
  the publisher needs from the learner. Nothing here imports training code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from recsys import checkpoint as ckpt
from recsys.errors import CheckpointError
from recsys.history import PAD, pad_histories
from recsys.model import ModelConfig, PolicyNet, user_buckets
from recsys.policy import Policy
from recsys.serving.device import resolve_device

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CATALOG_FILE = "catalog.json"


@dataclass
class ServingModel:
    """One loaded model version, ready to rank: what the publisher needs from the learner.

    ``user_states(items [B, N], users [B])`` -> ``[B, 2d+1]`` from item-index histories
    (left-padded with -1) and reward-head buckets (:meth:`buckets`); ``policy`` ranks against
    the model's item matrix (scores are the model's serving scores).
    """

    version: str
    path: str
    item_ids: list[str]
    index: dict[str, int]
    max_history: int
    policy: Policy
    manifest: dict[str, Any]
    _net: Any
    _item_vecs: torch.Tensor

    def buckets(self, user_ids: Sequence[str]) -> torch.Tensor:
        """The users' reward-head rows (:func:`recsys.model.user_bucket`) -> ``[B]``."""
        return user_buckets(user_ids, int(self._net.cfg.user_buckets), self._item_vecs.device)

    @torch.inference_mode()
    def user_states(
        self, items: torch.Tensor, users: torch.Tensor | None = None, chunk: int = 1024
    ) -> torch.Tensor:
        """States for left-padded histories ``items [B, N]``, in chunks of similar length.

        Users are sorted by history length and each chunk is cut to its longest history, so
        the encoder does not attend over padding (most users' histories are far shorter than
        N). The state does not depend on how much left padding a row has.
        """
        items = items.to(self._item_vecs.device)
        if users is None:
            users = torch.full((len(items),), -1, dtype=torch.long, device=items.device)
        users = users.to(items.device)
        lengths = (items != PAD).sum(1)
        order = torch.argsort(lengths)
        out: torch.Tensor | None = None
        for start in range(0, len(order), chunk):
            rows = order[start : start + chunk]
            width = max(int(lengths[rows].max()), 1)
            states = self._net.user_state(items[rows][:, -width:], self._item_vecs, users[rows])
            if out is None:
                out = states.new_empty((len(order), states.shape[1]))
            out[rows] = states
        if out is None:  # no users
            return self._net.user_state(items, self._item_vecs, users)
        return out


def load_serving_model(path: str | Path, policy_kwargs: Mapping[str, Any]) -> ServingModel:
    """Load checkpoint ``path`` (verified) with :func:`load_policy` and bind a :class:`Policy`.

    Raises CheckpointError for a partial, corrupt or empty-catalogue checkpoint.
    """
    wanted = policy_kwargs.get("device")
    device = resolve_device(wanted)
    net, item_ids, manifest = load_policy(path, device=str(device))
    if not item_ids:
        raise CheckpointError(f"{path}: model has no items yet")
    with torch.inference_mode():
        vecs = net.item_vectors().float()
        # Policy scores are the model's logits: state · item / the model's temperature.
        matrix = vecs / net.cfg.policy_temperature
    return ServingModel(
        version=str(manifest["model_version"]),
        path=str(manifest["path"]),
        item_ids=list(item_ids),
        index={i: n for n, i in enumerate(item_ids)},
        max_history=int(net.cfg.max_history),
        policy=Policy(matrix, **{**policy_kwargs, "device": device}),
        manifest=manifest,
        _net=net,
        _item_vecs=vecs,
    )


def policy_scores(
    model: PolicyNet,
    user_histories: Sequence[Sequence[int]] | torch.Tensor,
    users: torch.Tensor | None = None,
) -> torch.Tensor:
    """Serving scores ``[B, I]`` (float32, eval mode, no grad) for the given histories and
    reward-head buckets ``users [B]`` (None: unknown users)."""
    dev = next(model.parameters()).device
    if isinstance(user_histories, torch.Tensor):
        items = user_histories.to(dev)
    else:
        items, _ = pad_histories(user_histories, model.cfg.max_history, dev)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(items, None if users is None else users.to(dev)).float()
    model.train(was_training)
    return out


def load_policy(
    path: str | Path, device: str | None = "cpu"
) -> tuple[PolicyNet, list[str], dict[str, Any]]:
    """Load a checkpoint's model for inference -> ``(model in eval mode, item ids, manifest)``.

    ``item_ids[i]`` is the id of item index ``i``. ``path`` is a checkpoint directory, or a root
    holding several (the newest one that loads is taken: a version whose files verify but whose
    config is refused falls back to the one before). Raises CheckpointError when nothing loads.
    """
    path = Path(path)
    if (path / ckpt.MANIFEST).exists():
        return _load_policy_version(path, device)
    for version in ckpt.list_checkpoints(path):
        try:
            return _load_policy_version(version, device)
        except CheckpointError as exc:
            log.warning("skipping model version %s: %s", version.name, exc)
    raise CheckpointError(f"no valid checkpoint under {path}")


def _load_policy_version(
    path: Path, device: str | None
) -> tuple[PolicyNet, list[str], dict[str, Any]]:
    manifest = ckpt.read_manifest(path)
    try:
        cfg = ModelConfig.from_dict(manifest["config"]["model"])
        model = PolicyNet(cfg)
        # Only files the verified manifest lists are opened.
        model.load_state_dict(load_file(str(ckpt.checkpoint_file(path, manifest, MODEL_FILE))))
        catalog = ckpt.checkpoint_file(path, manifest, CATALOG_FILE).read_text()
        item_ids = [str(x) for x in json.loads(catalog)["ids"]]
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load policy: {exc}") from exc
    if len(item_ids) != model.num_items:
        raise CheckpointError(f"{path}: catalog has {len(item_ids)} ids, model {model.num_items}")
    manifest["path"] = str(path)
    manifest["model_version"] = path.name
    return model.to(resolve_device(device)).eval(), item_ids, manifest
