"""Publisher memory: resident bytes per user at the ``max_users`` bound, and per item.

For each user profile (positive events = history entries, other feedback = watched only), a
publisher with ``max_users = N`` observes N distinct users, then N more: Python's allocations
(``tracemalloc``, numpy included) are measured after each. Bytes per user is the first figure
over N; the ``ratio`` is the second over the first, which the bound keeps at ~1.0 (the second N
users evict the first; without a store they are forgotten, with one they are reloaded).

    python benchmarks/publisher_memory.py [--users 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recsys.events import Event
from recsys.publisher.core import Publisher, PublisherConfig

ITEMS = 10_000
T0 = 1_700_000_000_000
COOLDOWN_S = 300.0  # the shipped RECSYS_PUBLISHER__COOLDOWN_S: impressions are held for it
# name -> (positive events, other watched items, impressions inside the cooldown, users = N / d)
PROFILES = {
    "light (2 clicks, 3 skips)": (2, 3, 0, 1),
    "typical (20 clicks, 30 skips)": (20, 30, 0, 1),
    "typical + 5 slates of 10 shown": (20, 30, 50, 1),
    "full history (100 clicks, 100 skips)": (100, 100, 0, 4),
    "cooldown cap (200 impressions)": (100, 100, 200, 4),
    "max watched (100 clicks, 1900 skips)": (100, 1900, 0, 40),
}


def _events(
    first_user: int, users: int, positives: int, others: int, shown: int = 0
) -> list[Event]:
    out = []
    for u in range(first_user, first_user + users):
        uid = f"user-{u:08d}"
        for j in range(positives + others):
            item = f"item-{(u * 7919 + j * 104729) % ITEMS}"
            kind = "click" if j < positives else "skip"
            out.append(Event(f"e{u}-{j}", kind, uid, item, T0 + j))
        for j in range(shown):
            item = f"item-{(u * 104729 + j * 7919) % ITEMS}"
            out.append(
                Event(f"i{u}-{j}", "impression", uid, item, T0 + j, f"r{u}-{j // 10}", j % 10)
            )
    return out


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def measure(users: int, positives: int, others: int, shown: int = 0) -> dict[str, float]:
    cfg = PublisherConfig(history_len=50, device="cpu", max_users=users, cooldown_s=COOLDOWN_S)
    tracemalloc.start()
    try:
        pub = Publisher(cfg, lambda: None)
        pub.observe(_events(0, 1, 1, 0))  # the item table and structures exist before the base
        for i in range(ITEMS):
            pub._intern(f"item-{i}")
        base = _traced()
        for start in range(0, users, 1000):
            pub.observe(_events(start, min(1000, users - start), positives, others, shown))
            pub._dirty.clear()  # no batches in this benchmark: slates are not state
        at_bound = _traced() - base
        for start in range(users, 2 * users, 1000):
            pub.observe(_events(start, min(1000, 2 * users - start), positives, others, shown))
            pub._dirty.clear()
        after = _traced() - base
        assert pub.users_in_memory == users
    finally:
        tracemalloc.stop()
    return {
        "users": users,
        "bytes_per_user": at_bound / users,
        "mib_at_bound": at_bound / 2**20,
        "mib_after_2x_users": after / 2**20,
        "ratio": after / at_bound,
    }


def item_bytes() -> float:
    """Bytes per tracked item id (ids list, index dict, popularity, the id strings)."""
    cfg = PublisherConfig(device="cpu", max_items=200_000)
    tracemalloc.start()
    try:
        pub = Publisher(cfg, lambda: None)
        base = _traced()
        for i in range(100_000):
            pub._intern(f"item-{i:08d}")
        return (_traced() - base) / 100_000
    finally:
        tracemalloc.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=20_000, help="N = max_users (light profiles)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    rows = {}
    started = time.perf_counter()
    for name, (pos, other, shown, div) in PROFILES.items():
        rows[name] = measure(max(1, args.users // div), pos, other, shown)
    per_item = item_bytes()
    print(
        f"publisher memory: history_len 50 (100 retained), watched_len 2000, cooldown "
        f"{COOLDOWN_S:.0f} s (200 impressions kept), {ITEMS} items"
    )
    print(f"{'profile':40s} {'users':>7s} {'B/user':>9s} {'MiB':>8s} {'MiB 2xN':>8s} {'2xN/N':>6s}")
    for name, r in rows.items():
        print(
            f"{name:40s} {r['users']:7d} {r['bytes_per_user']:9,.0f} {r['mib_at_bound']:8.1f} "
            f"{r['mib_after_2x_users']:8.1f} {r['ratio']:6.3f}"
        )
    print(f"item table: {per_item:,.0f} B per item id")
    typical = rows["typical (20 clicks, 30 skips)"]["bytes_per_user"]
    print(f"at the default max_users=100,000: typical {typical * 1e5 / 2**20:,.0f} MiB per replica")
    ratio = max(r["ratio"] for r in rows.values())
    print(f"ratio (memory after 2N users / at N, the bound holds at ~1.0): {ratio:.3f}")
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        args.json.write_text(
            json.dumps({"profiles": rows, "bytes_per_item": per_item, "ratio": ratio}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
