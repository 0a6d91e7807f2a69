"""The SQL store on real SQLite files and a real PostgreSQL database."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa

from recsys.errors import FencedError
from recsys.events import Slate, SlateItem
from recsys.store import (
    SCHEMA_VERSION,
    SlateWrite,
    Store,
    StoreError,
    UserStateRow,
    partition_for,
)

NASTY_IDS = [
    "robert'); DROP TABLE recommendations;--",
    'quote"double',
    "semi;colon",
    "ユーザー👩‍🚀",
    "tab\tnewline\n",
    "back\\slash",
    "x" * 1000,
]


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sub' / 'store.db'}"
    return request.getfixturevalue("pg_url")


def _slate(user: str, version: str = "v000000000001", n: int = 3) -> Slate:
    items = tuple(SlateItem(f"item-{user}-{j}", 1.0 - j, 0.5 / (j + 1), j) for j in range(n))
    return Slate(uuid.uuid4().hex, user, version, 1_700_000_000_000, items)


def test_ids_stored_verbatim_and_upsert_replaces(store_url):
    with Store(store_url) as store:
        slates = [_slate(u) for u in NASTY_IDS]
        store.save_batch([SlateWrite(s, "model", 123) for s in slates])
        for s in slates:
            got = store.get_recommendation(s.user_id)
            assert got is not None
            assert got.slate == s
            assert got.event_ts == 123
            assert got.policy == "model"
        newer = _slate(NASTY_IDS[0], version="v000000000002", n=5)
        store.save_batch([SlateWrite(newer, "cold_start")])
        got = store.get_recommendation(NASTY_IDS[0])
        assert got is not None
        assert got.slate == newer
        assert got.policy == "cold_start"
        assert set(NASTY_IDS) <= set(store.known_users())
        assert store.get_recommendation("nobody") is None


def test_batch_writes_histories_popularity_and_cold_start_together(store_url):
    with Store(store_url) as store:
        u = f"ü'; -- {uuid.uuid4().hex}"  # the PostgreSQL database is shared by the session
        entries = [(1, "a;b", "e1"), (2, "'c'", "e2")]
        cold = _slate("")
        store.save_batch(
            [SlateWrite(_slate(u), "model", 2)],
            histories={u: entries},
            popularity={"a;b": 2, "'c'": 1},
            cold_start=cold,
        )
        store.save_batch([], popularity={"a;b": 3})
        assert dict(store.load_histories())[u] == entries
        pop = store.load_popularity()
        assert (pop["a;b"], pop["'c'"]) == (5, 1)
        got = store.get_cold_start()
        assert got is not None
        assert got.slate.items == cold.items


def test_failed_batch_leaves_nothing(store_url):
    with Store(store_url) as store:
        good = _slate("u1")
        bad = _slate("u2")
        store.save_batch([], popularity={"pop-before": 1})
        # A non-JSON-serialisable score makes the batch fail half way through its statements.
        item = SlateItem("i", object(), 1.0, 0)  # type: ignore[arg-type]
        broken = Slate(bad.request_id, "u2", bad.model_version, bad.ts, (item,))
        with pytest.raises((TypeError, sa.exc.StatementError)):
            store.save_batch(
                [SlateWrite(good, "model")],
                histories={"u1": [(1, "i", "e")]},
                cold_start=broken,
            )
        assert store.get_recommendation("u1") is None
        assert "u1" not in dict(store.load_histories())
        assert store.load_popularity()["pop-before"] == 1


def test_model_versions_recorded_idempotently(store_url):
    with Store(store_url) as store:
        store.record_model_version("v000000000007", "/ckpt/v000000000007", metrics={"loss": 0.5})
        store.record_model_version("v000000000007", "/ckpt/v000000000007", metrics={"loss": 0.5})
        store.record_model_version("v000000000009", "/ckpt/v000000000009")
        versions = {v["version"]: v for v in store.model_versions()}
        assert {"v000000000007", "v000000000009"} <= set(versions)
        assert versions["v000000000007"]["metrics"] == {"loss": 0.5}


def test_schema_created_once_and_upgraded_in_place(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        # An older layout: recommendations without the nullable event_ts column, no version row.
        conn.execute(
            sa.text(
                "CREATE TABLE recommendations (user_id TEXT PRIMARY KEY, request_id TEXT NOT NULL,"
                " model_version TEXT NOT NULL, policy TEXT NOT NULL, items JSON NOT NULL,"
                " published_ms BIGINT NOT NULL, updated_at DATETIME NOT NULL)"
            )
        )
    engine.dispose()
    with Store(url) as store:
        assert store.schema_version() == SCHEMA_VERSION
        store.save_batch([SlateWrite(_slate("u"), "model", 42)])
        got = store.get_recommendation("u")
        assert got is not None
        assert got.event_ts == 42
    with Store(url) as store:  # reopening is a no-op
        assert store.get_recommendation("u") is not None


def test_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    Store(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE schema_info SET version = :v"), {"v": SCHEMA_VERSION + 1})
    engine.dispose()
    with pytest.raises(StoreError, match="newer"):
        Store(url)


def test_bad_url_is_a_clear_error():
    with pytest.raises(StoreError, match="url"):
        Store("mysql://x/y")


def test_user_state_rows_round_trip_and_page_by_partition(store_url):
    tag = uuid.uuid4().hex[:8]  # the PostgreSQL database is shared by the session
    users = [f"{u}-{tag}" for u in NASTY_IDS]
    with Store(store_url) as store:
        states = [
            UserStateRow(
                u,
                n % 2,
                ((1, "a;b", f"e{n}", None), (2, "'c'", f"f{n}", f"req-{n}")),
                ("x", "a;b", "'c'"),
                n,
                2.5 * n,
            )
            for n, u in enumerate(users)
        ]
        store.save_batch([SlateWrite(_slate(users[0]), "model")], states=states)
        got = store.load_user_states([*users, f"nobody-{tag}"])
        assert got == {st.user_id: st for st in states}
        evens = sorted(u for n, u in enumerate(users) if n % 2 == 0)
        paged: list[str] = []
        while page := store.owned_users(0, after=paged[-1] if paged else "", limit=2):
            paged.extend(page)
        assert [u for u in paged if u.endswith(tag)] == evens
        # Only users whose stored slate is not of the version: users[0] has v1.
        stale = store.owned_users(0, stale_for="v000000000001", limit=100)
        assert users[0] not in stale
        assert set(evens) - {users[0]} <= set(stale)


def test_publisher_offsets_are_written_with_the_batch(store_url):
    group = f"g-{uuid.uuid4().hex[:8]}"
    with Store(store_url) as store:
        assert store.publisher_offsets(group) == {}
        store.save_batch([], offsets={(group, "events", 0): 10, (group, "events", 3): 7})
        store.save_batch([], offsets={(group, "events", 0): 12})
        assert store.publisher_offsets(group) == {("events", 0): 12, ("events", 3): 7}


def test_a_zombie_replicas_batch_is_refused_whole(store_url):
    """Replica A lost partition 0 to B, which stored up to offset 20; A's late batch (up to 15)
    must change nothing, not even its rows for partitions nobody took."""
    group, tag = f"g-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:8]
    moved, kept = f"moved-{tag}", f"kept-{tag}"
    old = UserStateRow(moved, 0, ((1, "old", "e1", None),), ("old",))
    newer = UserStateRow(moved, 0, ((1, "old", "e1", None), (2, "new", "e2", None)), ("old", "new"))
    with Store(store_url) as store:
        store.save_batch([], states=[old], offsets={(group, "events", 0): 10})
        store.save_batch([], states=[newer], offsets={(group, "events", 0): 20})  # B
        zombie = [old, UserStateRow(kept, 1, (), ("x",))]
        with pytest.raises(FencedError, match=r"events\[0\] up to offset 20"):
            store.save_batch(
                [SlateWrite(_slate(kept), "model")],
                states=zombie,
                offsets={(group, "events", 0): 15, (group, "events", 1): 5},
            )
        assert store.load_user_states([moved, kept]) == {moved: newer}
        assert store.get_recommendation(kept) is None
        assert store.publisher_offsets(group) == {("events", 0): 20}
        # The owner's own re-read of the same range (equal offsets) is not fenced.
        store.save_batch([], states=[newer], offsets={(group, "events", 0): 20})


def test_partition_for_is_kafka_pythons_default_partitioner():
    from kafka.partitioner.default import DefaultPartitioner

    class Cluster:
        def topics(self):
            return {"t"}

        def partitions_for_topic(self, topic):
            return set(range(6))

        def available_partitions_for_topic(self, topic):
            return set(range(6))

    part = DefaultPartitioner()
    for user in NASTY_IDS + [f"user-{n}" for n in range(200)]:
        key = user.encode()
        assert partition_for(user, 6) == part.partition("t", user, key, None, None, Cluster())
    with pytest.raises(ValueError, match="partitions"):
        partition_for("u", 0)


def test_version_1_rows_get_a_partition_and_a_watched_list(tmp_path):
    url = f"sqlite:///{tmp_path / 'v1.db'}"
    with Store(url) as store:
        store.save_batch(
            [SlateWrite(_slate("only-a-slate"), "model")],
            histories={"u1": [(1, "m1", "e1"), (2, "m2", "e2")]},
        )
        assert store.fill_partitions(4) == 2
        assert store.fill_partitions(4) == 0
        got = store.load_user_states(["u1", "only-a-slate"])
        assert got["u1"].partition == partition_for("u1", 4)
        assert got["u1"].watched == ("m1", "m2")  # a version-1 row: its positives
        assert got["u1"].entries == ((1, "m1", "e1", None), (2, "m2", "e2", None))
        assert got["only-a-slate"].partition == partition_for("only-a-slate", 4)
        assert "u1" in store.owned_users(partition_for("u1", 4))
