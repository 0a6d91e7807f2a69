"""The learner's checkpoint I/O helpers: optimizer state as safetensors + JSON (no pickle)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from recsys.errors import CheckpointError

log = logging.getLogger(__name__)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_to_flat(
    opt: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    names = _param_names(model)
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for p, st in opt.state.items():
        name = names[id(p)]
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(name, {})[k] = v
    groups = []
    for g in opt.param_groups:
        g2 = {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
        g2["params"] = [names[id(p)] for p in g["params"]]
        groups.append(g2)
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(
    opt: torch.optim.Optimizer,
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> None:
    params = dict(model.named_parameters())
    order = [n for g in meta["param_groups"] for n in g["params"]]
    if not set(order) <= set(params):
        raise CheckpointError("optimizer state does not match the model's parameters")
    # Parameters added since the checkpoint was written (e.g. the reward head) start with
    # fresh optimizer state, in the last group.
    added = [n for n in params if n not in set(order)]
    state: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(order):
        st = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
        st.update(meta["scalars"].get(name, {}))
        if st:
            state[i] = st
    groups = []
    start = 0
    for n, g in enumerate(meta["param_groups"]):
        size = len(g["params"]) + (len(added) if n == len(meta["param_groups"]) - 1 else 0)
        g2 = {k: (tuple(v) if k == "betas" else v) for k, v in g.items() if k != "params"}
        g2["params"] = list(range(start, start + size))
        start += size
        groups.append(g2)
    order += added
    # our param order must match the saved one for load_state_dict's positional mapping
    if len(opt.param_groups) != 1:
        raise CheckpointError("only single-group optimizers can be restored")
    opt.param_groups[0]["params"] = [params[n] for n in order]
    opt.load_state_dict({"state": state, "param_groups": groups})
