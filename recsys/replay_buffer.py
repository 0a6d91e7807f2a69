"""The replay buffer: bounded, preallocated on the learner's device, recent + reservoir.

Every sample added goes into a **recent** ring (the newest ``recent_capacity`` samples) and is
offered to a **reservoir** (Vitter's algorithm R over the whole stream, ``capacity −
recent_capacity`` slots), so the reservoir stays a uniform sample of everything seen while the ring
tracks the present. :meth:`ReplayBuffer.sample` draws ``recent_fraction`` of a batch from the ring
and the rest from the reservoir.

Insertion is vectorised: ``add`` of ``b`` samples costs O(b log b) tensor work, whatever the
capacity; there is no per-sample Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from recsys.history import PAD


@dataclass(frozen=True)
class Transitions:
    """A batch of training samples (all tensors on one device).

    ``history [B, N]`` item indices as of the impression, left-padded with -1; ``item [B]`` the
    logged item; ``reward [B]``; ``propensity [B]`` (NaN when unknown); ``position [B]`` (-1 when
    unknown); ``user [B]`` the user's reward-head bucket (:func:`recsys.model.user_bucket`; -1
    when unknown, and everywhere when left out).
    """

    history: torch.Tensor
    item: torch.Tensor
    reward: torch.Tensor
    propensity: torch.Tensor
    position: torch.Tensor
    user: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.user is None:
            object.__setattr__(self, "user", torch.full_like(self.position, -1))

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def to(self, device: torch.device | str) -> Transitions:
        return Transitions(*(getattr(self, f.name).to(device) for f in fields(self)))

    @property
    def users(self) -> torch.Tensor:
        """``user`` as a tensor (always set after construction)."""
        assert self.user is not None
        return self.user


class RewardRows(NamedTuple):
    """What the reward head reads of the held rows, ``[n]`` each (:meth:`ReplayBuffer.reward_rows`):
    ``logged`` is True where a propensity was logged (an impression or feedback joined to it)."""

    user: torch.Tensor
    item: torch.Tensor
    reward: torch.Tensor
    logged: torch.Tensor
    weight: torch.Tensor


_DTYPES = {
    "history": torch.int32,
    "item": torch.int32,
    "reward": torch.float32,
    "propensity": torch.float32,
    "position": torch.int32,
    "user": torch.int32,
}


def reservoir_slots(seen: int, u: torch.Tensor, capacity: int) -> torch.Tensor:
    """Algorithm R slot of each of ``b`` new stream elements, given uniform draws ``u [b]``.

    Element ``i`` is the ``(seen + i)``-th of the stream (0-based). While the reservoir is filling
    it takes slot ``seen + i``; after, it replaces slot ``j = floor(u·(n+1))`` if ``j < capacity``.
    Returns ``[b]`` slots, -1 for elements not kept. Later elements of the batch overwrite earlier
    ones in the same slot, as a one-by-one insertion would.
    """
    n = seen + torch.arange(u.shape[0], device=u.device, dtype=torch.int64)
    j = torch.floor(u.double() * (n + 1).double()).long().minimum(n)
    return torch.where(n < capacity, n, torch.where(j < capacity, j, torch.full_like(j, -1)))


def last_writer(slots: torch.Tensor) -> torch.Tensor:
    """Bool [b]: True for the last element writing each slot (slot -1 never wins)."""
    b = slots.shape[0]
    sorted_slots, perm = torch.sort(slots, stable=True)
    last_in_run = torch.ones(b, dtype=torch.bool, device=slots.device)
    if b > 1:
        last_in_run[:-1] = sorted_slots[:-1] != sorted_slots[1:]
    win = torch.zeros(b, dtype=torch.bool, device=slots.device)
    win[perm] = last_in_run
    return win & (slots >= 0)


class ReplayBuffer:
    """Bounded replay buffer with preallocated tensors.

    Parameters
    ----------
    capacity:
        Total samples held (ring + reservoir), >= 1.
    history_len:
        N, the width of stored history snapshots.
    recent_capacity:
        Size of the recent ring; default ``capacity // 4``. ``capacity`` means ring only.
    recent_fraction:
        Share of each sampled batch drawn from the ring, in [0, 1].
    device:
        Where the tensors live (the learner's device).
    seed:
        Seeds the buffer's own generator (reservoir decisions and sampling).
    """

    def __init__(
        self,
        capacity: int,
        history_len: int,
        recent_capacity: int | None = None,
        recent_fraction: float = 0.5,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len must be an int >= 1, got {history_len!r}")
        recent_capacity = capacity // 4 if recent_capacity is None else recent_capacity
        if not isinstance(recent_capacity, int) or not 0 <= recent_capacity <= capacity:
            raise ValueError(
                f"recent_capacity must be an int in [0, {capacity}], got {recent_capacity!r}"
            )
        if not 0.0 <= recent_fraction <= 1.0:
            raise ValueError(f"recent_fraction must be in [0, 1], got {recent_fraction!r}")
        if recent_capacity == 0 and recent_fraction > 0:
            recent_fraction = 0.0
        if recent_capacity == capacity:
            recent_fraction = 1.0
        self.capacity = capacity
        self.history_len = history_len
        self.recent_capacity = recent_capacity
        self.reservoir_capacity = capacity - recent_capacity
        self.recent_fraction = recent_fraction
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._store = {
            name: torch.empty(
                (capacity, history_len) if name == "history" else (capacity,),
                dtype=dtype,
                device=self.device,
            )
            for name, dtype in _DTYPES.items()
        }
        # rows [0, R) are the ring, rows [R, capacity) the reservoir
        self.seen = 0  # samples ever added
        self._ring_ptr = 0
        self._ring_size = 0
        self._res_size = 0

    def __len__(self) -> int:
        return self._ring_size + self._res_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._store.values())

    def add(self, batch: Transitions) -> None:
        """Insert a batch; O(b log b), vectorised."""
        b = len(batch)
        if b == 0:
            return
        if batch.history.shape[1] != self.history_len:
            raise ValueError(
                f"history width {batch.history.shape[1]} != history_len {self.history_len}"
            )
        data = {
            f.name: getattr(batch, f.name).to(self.device, _DTYPES[f.name], non_blocking=True)
            for f in fields(batch)
        }
        if self.recent_capacity:
            keep = min(b, self.recent_capacity)
            rows = (self._ring_ptr + torch.arange(b - keep, b, device=self.device)) % (
                self.recent_capacity
            )
            for name, src in data.items():
                self._store[name].index_copy_(0, rows, src[b - keep :])
            self._ring_ptr = (self._ring_ptr + b) % self.recent_capacity
            self._ring_size = min(self.recent_capacity, self._ring_size + b)
        if self.reservoir_capacity:
            u = torch.rand(b, generator=self.generator, device=self.device, dtype=torch.float64)
            slots = reservoir_slots(self.seen, u, self.reservoir_capacity)
            win = last_writer(slots)
            src_idx = win.nonzero().squeeze(1)
            rows = slots[src_idx] + self.recent_capacity
            for name, src in data.items():
                self._store[name].index_copy_(0, rows, src[src_idx])
            self._res_size = min(self.reservoir_capacity, self.seen + b)
        self.seen += b

    def sample(self, n: int) -> Transitions:
        """Draw ``n`` samples with replacement: ``recent_fraction`` from the ring, rest reservoir.

        Returns :class:`Transitions` on the buffer's device.
        """
        if len(self) == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        n_recent = round(n * self._recent_share())
        g = self.generator
        parts = []
        if n_recent:
            parts.append(
                torch.randint(0, self._ring_size, (n_recent,), generator=g, device=self.device)
            )
        if n - n_recent:
            res = torch.randint(0, self._res_size, (n - n_recent,), generator=g, device=self.device)
            parts.append(res + self.recent_capacity)
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        return self.gather(rows)

    def _recent_share(self) -> float:
        """The share of :meth:`sample`'s draws taken from the ring (all of them while the
        reservoir is empty, none while the ring is)."""
        if self._res_size == 0:
            return 1.0
        if self._ring_size == 0:
            return 0.0
        return self.recent_fraction

    def gather(self, rows: torch.Tensor) -> Transitions:
        s = self._store
        return Transitions(
            history=s["history"][rows].long(),
            item=s["item"][rows].long(),
            reward=s["reward"][rows],
            propensity=s["propensity"][rows],
            position=s["position"][rows].long(),
            user=s["user"][rows].long(),
        )

    def reward_rows(self) -> RewardRows:
        """The reward columns of every held row, ``weight`` the row's probability of being
        drawn by :meth:`sample` times the rows held (mean 1): a weighted sum over the rows is
        what batches of samples average to."""
        recent, reservoir = self.recent_rows(), self.reservoir_rows()
        share, n = self._recent_share(), len(recent) + len(reservoir)
        weight = torch.cat(
            [
                torch.full((len(recent),), share * n / max(len(recent), 1), device=self.device),
                torch.full(
                    (len(reservoir),), (1 - share) * n / max(len(reservoir), 1), device=self.device
                ),
            ]
        )
        rows = torch.cat([recent, reservoir])
        s = self._store
        return RewardRows(
            s["user"][rows].long(),
            s["item"][rows].long(),
            s["reward"][rows],
            torch.isfinite(s["propensity"][rows]),
            weight,
        )

    def recent_rows(self) -> torch.Tensor:
        """Rows of the ring, oldest first."""
        if self._ring_size < self.recent_capacity:
            return torch.arange(self._ring_size, device=self.device)
        r = self.recent_capacity
        return (torch.arange(r, device=self.device) + self._ring_ptr) % r

    def reservoir_rows(self) -> torch.Tensor:
        return torch.arange(self._res_size, device=self.device) + self.recent_capacity

    # --- persistence ------------------------------------------------------------------------

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Held rows (ring in order, then reservoir) as tensors, plus counters."""
        rows = torch.cat([self.recent_rows(), self.reservoir_rows()])
        tensors = {f"replay.{k}": v[rows].contiguous().cpu() for k, v in self._store.items()}
        tensors["replay.generator"] = self.generator.get_state().cpu()
        meta = {"seen": self.seen, "ring_size": self._ring_size, "res_size": self._res_size}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, int]) -> None:
        ring, res = int(meta["ring_size"]), int(meta["res_size"])
        if ring > self.recent_capacity or res > self.reservoir_capacity:
            raise ValueError("saved replay buffer does not fit this buffer's capacities")
        for k, store in self._store.items():
            if k == "user" and "replay.user" not in tensors:  # saved before the reward head
                t = torch.full((ring + res,), -1, dtype=store.dtype, device=self.device)
            else:
                t = tensors[f"replay.{k}"].to(self.device, store.dtype)
            if k == "history" and t.shape[1] != self.history_len:
                raise ValueError("saved replay history width differs from history_len")
            store[:ring] = t[:ring]
            store[self.recent_capacity : self.recent_capacity + res] = t[ring : ring + res]
        self._ring_size, self._res_size = ring, res
        self._ring_ptr = ring % self.recent_capacity if self.recent_capacity else 0
        self.seen = int(meta["seen"])
        if "replay.generator" in tensors:
            self.generator.set_state(tensors["replay.generator"].cpu())


def empty_history(n: int, history_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n, history_len]`` of PAD (no history)."""
    return torch.full((n, history_len), PAD, dtype=torch.long, device=device)
