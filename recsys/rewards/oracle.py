"""The reference join: rewards computed offline from a whole event list, in a few plain loops.

It shares no code with the streaming :class:`~recsys.rewards.join.RewardJoin` (only the reward
rules, which have their own tests), so tests and the kill test can compare the two. It reads
the semantics straight from their definition:

- events are taken in arrival order; a repeated ``event_id`` is ignored;
- a feedback event's impression is the last earlier impression of the same user with the same
  ``request_id`` and ``item_id`` or, without ``request_id``, the user's earlier impression of
  the item with the greatest ``ts <= feedback ts``;
- ``ts < impression ts + window``: joined; ``< ... + window + late retention``: late (organic
  or dropped by ``late_rule``); otherwise, or with no impression: organic;
- every impression with no joined feedback gets one default record (reward 0).

It assumes what the streaming join needs to agree with it: every event arrives no more than
the allowed lateness behind the largest ``ts`` seen before it in its partition, and duplicates
arrive within the dedupe horizon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from recsys.config import RewardSettings
from recsys.events import Event, RewardRecord
from recsys.rewards.rules import RewardRules


def _rid(prefix: str, event_id: str) -> str:
    return hashlib.sha1(
        f"{prefix}:{event_id}".encode("utf-8", "surrogatepass"), usedforsecurity=False
    ).hexdigest()


def offline_join(
    events: Iterable[Event],
    rules: RewardRules | None = None,
    *,
    window_ms: int = 30 * 60 * 1000,
    late_rule: str = "organic",
    late_retention_ms: int = 10 * 60 * 1000,
) -> dict[str, RewardRecord]:
    """All reward records of ``events`` (in arrival order), by ``reward_id``."""
    rules = rules or RewardRules()
    seen: set[str] = set()
    impressions: dict[str, list[Event]] = {}  # user -> impressions in arrival order
    joined: set[str] = set()
    ratings: dict[str, list[float]] = {}  # user -> earlier rating values
    out: dict[str, RewardRecord] = {}
    order: list[Event] = []

    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        if e.type == "impression":
            impressions.setdefault(e.user_id, []).append(e)
            order.append(e)
            continue

        if e.type == "rating" and rules.rating_centre == "user" and e.value is not None:
            earlier = ratings.setdefault(e.user_id, [])
            centre = rules.user_centre(len(earlier), sum(earlier))
            reward = rules.value("rating", e.value, centre)
            earlier.append(e.value)
        else:
            reward = rules.value(e.type, e.value)

        mine = impressions.get(e.user_id, [])
        target: Event | None = None
        if e.request_id is not None:
            for imp in mine:
                if imp.request_id == e.request_id and imp.item_id == e.item_id:
                    target = imp  # the last one wins
        else:
            for imp in mine:
                if (
                    imp.item_id == e.item_id
                    and imp.ts <= e.ts
                    and (target is None or imp.ts >= target.ts)
                ):
                    target = imp  # the greatest ts; among equals, the last

        rid = _rid("feedback", e.event_id)
        if target is not None and e.ts < target.ts + window_ms:
            joined.add(target.event_id)
            out[rid] = RewardRecord(
                reward_id=rid,
                user_id=e.user_id,
                item_id=e.item_id,
                reward=reward,
                ts=target.ts,
                kind="joined",
                propensity=target.propensity,
                position=target.position,
                model_version=target.model_version,
                request_id=target.request_id,
            )
            continue
        if (
            target is not None
            and e.ts < target.ts + window_ms + late_retention_ms
            and late_rule == "drop"
        ):
            continue
        out[rid] = RewardRecord(
            reward_id=rid,
            user_id=e.user_id,
            item_id=e.item_id,
            reward=reward,
            ts=e.ts,
            kind="organic",
            propensity=None,
            position=e.position,
            model_version=e.model_version,
            request_id=e.request_id,
        )

    for imp in order:
        if imp.event_id in joined:
            continue
        rid = _rid("default", imp.event_id)
        out[rid] = RewardRecord(
            reward_id=rid,
            user_id=imp.user_id,
            item_id=imp.item_id,
            reward=0.0,
            ts=imp.ts,
            kind="default",
            propensity=imp.propensity,
            position=imp.position,
            model_version=imp.model_version,
            request_id=imp.request_id,
        )
    return out


def offline_join_for(events: Iterable[Event], settings: RewardSettings) -> dict[str, RewardRecord]:
    """:func:`offline_join` with the rules, window and lateness of a reward worker running
    with ``settings``: the oracle the fault tests and benchmarks compare the worker with."""
    return offline_join(
        events,
        RewardRules.from_settings(settings),
        window_ms=settings.window_ms,
        late_rule=settings.late_rule,
        late_retention_ms=settings.late_retention_ms,
    )
