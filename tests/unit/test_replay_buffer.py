"""The replay buffer (recent ring + reservoir), with hypothesis for the insert logic."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.replay_buffer import ReplayBuffer, Transitions, last_writer, reservoir_slots


def _batch(start: int, n: int, width: int = 3) -> Transitions:
    ids = torch.arange(start, start + n)
    return Transitions(
        history=ids.unsqueeze(1).repeat(1, width),
        item=ids,
        reward=ids.float(),
        propensity=torch.where(ids % 2 == 0, 0.5, math.nan),
        position=ids % 5,
    )


def _held(buf: ReplayBuffer, rows: torch.Tensor) -> list[int]:
    return buf.gather(rows).item.tolist()


def _reference_reservoir(sizes: list[int], draws: list[torch.Tensor], cap: int) -> list[int]:
    """Algorithm R one element at a time, with the same uniform draws."""
    res: list[int] = []
    seen = 0
    for b, u in zip(sizes, draws, strict=True):
        for k in range(b):
            n = seen + k
            if n < cap:
                res.append(n)
            else:
                j = min(math.floor(float(u[k]) * (n + 1)), n)
                if j < cap:
                    res[j] = n
        seen += b
    return res


@settings(max_examples=60, deadline=None)
@given(
    cap=st.integers(1, 12),
    sizes=st.lists(st.integers(0, 20), min_size=1, max_size=8),
    seed=st.integers(0, 1000),
)
def test_vectorised_reservoir_matches_one_by_one(cap: int, sizes: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    draws = [torch.rand(b, generator=g, dtype=torch.float64) for b in sizes]
    slots_state = [-1] * cap
    seen = 0
    for b, u in zip(sizes, draws, strict=True):
        slots = reservoir_slots(seen, u, cap)
        win = last_writer(slots)
        for k in win.nonzero().squeeze(1).tolist():
            slots_state[int(slots[k])] = seen + k
        seen += b
    ref = _reference_reservoir(sizes, draws, cap)
    assert slots_state[: len(ref)] == ref


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(1, 30),
    recent=st.integers(0, 30),
    sizes=st.lists(st.integers(0, 25), min_size=1, max_size=10),
)
def test_buffer_invariants(capacity: int, recent: int, sizes: list[int]) -> None:
    recent = min(recent, capacity)
    buf = ReplayBuffer(capacity, 3, recent_capacity=recent, recent_fraction=0.5, seed=1)
    total = 0
    for b in sizes:
        buf.add(_batch(total, b))
        total += b
        assert buf.seen == total
        assert len(buf) <= capacity
        # the ring holds exactly the newest min(total, recent), oldest first
        assert _held(buf, buf.recent_rows()) == list(range(max(0, total - recent), total))
        res = _held(buf, buf.reservoir_rows())
        assert len(res) == min(total, capacity - recent)
        assert len(set(res)) == len(res)
        assert all(0 <= x < total for x in res)
        if total <= capacity - recent:
            assert sorted(res) == list(range(total))  # nothing dropped while filling
    if total:
        s = buf.sample(40)
        assert len(s) == 40
        # every field of a sampled row belongs to the same added sample
        ids = s.item
        assert (s.history == ids.unsqueeze(1)).all()
        assert (s.reward == ids.float()).all()
        assert (s.position == ids % 5).all()
        assert torch.equal(torch.isnan(s.propensity), ids % 2 == 1)
        assert all(0 <= x < total for x in ids.tolist())


def test_sampling_mixes_recent_and_reservoir() -> None:
    buf = ReplayBuffer(1000, 3, recent_capacity=100, recent_fraction=0.25, seed=0)
    for k in range(50):
        buf.add(_batch(k * 100, 100))
    s = buf.sample(4000).item
    assert s.dtype == torch.long
    recent = (s >= 4900).float().mean().item()
    # a quarter from the ring (the last 100), plus the reservoir's own share of them (~100/4900)
    assert 0.22 < recent < 0.30
    # the reservoir is a uniform sample of the whole stream: old and new halves both present
    res = torch.tensor(_held(buf, buf.reservoir_rows()))
    assert 0.4 < (res < 2500).float().mean().item() < 0.6


def test_large_batch_larger_than_ring() -> None:
    buf = ReplayBuffer(10, 2, recent_capacity=4)
    buf.add(_batch(0, 9, width=2))
    assert _held(buf, buf.recent_rows()) == [5, 6, 7, 8]
    buf.add(_batch(9, 2, width=2))
    assert _held(buf, buf.recent_rows()) == [7, 8, 9, 10]


def test_validation_and_empty_buffer() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, 3)
    with pytest.raises(ValueError, match="recent_capacity"):
        ReplayBuffer(5, 3, recent_capacity=6)
    with pytest.raises(ValueError, match="recent_fraction"):
        ReplayBuffer(5, 3, recent_fraction=1.5)
    buf = ReplayBuffer(5, 3)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(1)
    with pytest.raises(ValueError, match="history width"):
        buf.add(_batch(0, 2, width=4))
    buf.add(_batch(0, 0))
    assert len(buf) == 0


def test_state_round_trip() -> None:
    buf = ReplayBuffer(20, 3, recent_capacity=5, seed=3)
    for k in range(7):
        buf.add(_batch(k * 6, 6))
    tensors, meta = buf.state_dict()
    other = ReplayBuffer(20, 3, recent_capacity=5, seed=99)
    other.load_state_dict(tensors, meta)
    assert _held(other, other.recent_rows()) == _held(buf, buf.recent_rows())
    assert _held(other, other.reservoir_rows()) == _held(buf, buf.reservoir_rows())
    assert other.seen == buf.seen
    assert torch.equal(other.generator.get_state(), buf.generator.get_state())
    other.add(_batch(100, 3))
    assert _held(other, other.recent_rows())[-3:] == [100, 101, 102]


def test_users_are_kept_and_default_to_unknown() -> None:
    buf = ReplayBuffer(20, 3, recent_capacity=5, seed=3)
    batch = _batch(0, 6)
    assert batch.users.tolist() == [-1] * 6  # left out: unknown users
    buf.add(Transitions(batch.history, batch.item, batch.reward, batch.propensity,
                        batch.position, torch.arange(6) * 10))  # fmt: skip
    rows = torch.cat([buf.recent_rows(), buf.reservoir_rows()])
    held = buf.gather(rows)
    pairs = set(zip(held.item.tolist(), held.users.tolist(), strict=True))
    assert pairs == {(i, 10 * i) for i in held.item.tolist()}  # each sample keeps its user
    # a buffer saved before users were stored restores with unknown users
    tensors, meta = buf.state_dict()
    del tensors["replay.user"]
    other = ReplayBuffer(20, 3, recent_capacity=5, seed=3)
    other.load_state_dict(tensors, meta)
    restored = other.gather(torch.cat([other.recent_rows(), other.reservoir_rows()]))
    assert restored.item.tolist() == held.item.tolist()
    assert restored.users.tolist() == [-1] * len(held)
