"""Publisher logic without Kafka: histories, cold start, micro-batches, hot swap, restore.

Models are real checkpoints written by the learner (tiny configs), loaded by its loader.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from recsys import metrics
from recsys.events import Event
from recsys.history import pad_histories
from recsys.model import user_bucket
from recsys.publisher.core import NO_MODEL_VERSION, Publisher, PublisherConfig
from recsys.rewards.rules import RewardRules
from recsys.serving.model import load_policy, load_serving_model, policy_scores
from recsys.serving.watcher import ModelWatcher
from recsys.store import Store
from tests.checkpoints import make_checkpoint, tiny_learner

ITEMS = [f"m{i}" for i in range(40)]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ev(n: int, user: str, item: str, kind: str = "click", ts: int = 0, value=None) -> Event:
    return Event(f"e{n}", kind, user, item, ts or 1_700_000_000_000 + n, value=value)


def make_publisher(model=lambda: None, store=None, **kw) -> tuple[Publisher, Clock]:
    cfg = PublisherConfig(**{"k": 5, "history_len": 10, "seed": 0, "device": "cpu", **kw})
    pub = Publisher(cfg, model, store=store)
    clock = Clock()
    pub._mono = clock  # type: ignore[method-assign]  # deterministic micro-batch timing
    return pub, clock


def test_history_holds_positive_feedback_once_in_event_time_order():
    pub, _ = make_publisher()
    pub.observe(
        [
            ev(1, "u", "a", ts=30),
            ev(2, "u", "b", "impression", ts=10),
            ev(3, "u", "c", "skip", ts=20),
            ev(4, "u", "d", "rating", ts=5, value=2.0),  # below the global mean: negative
            ev(5, "u", "e", "rating", ts=7, value=5.0),
            ev(6, "u", "f", "purchase", ts=1),
            ev(1, "u", "a", ts=30),  # the same event again (re-read after a restart)
        ]
    )
    assert [pub.item_ids[i] for i in pub.histories.get("u")] == ["f", "e", "a"]
    st = pub._peek("u")
    assert st is not None
    assert [e[1] for e in st.entries] == ["f", "e", "a"]


def test_unknown_users_get_cold_start_slates_of_popular_items():
    pub, clock = make_publisher()
    events = [ev(n, f"fan{n}", "hit") for n in range(30)]
    events += [ev(100 + n, f"x{n}", f"rare{n % 20}", "impression") for n in range(400)]
    events.append(ev(999, "newbie", "rare0", "impression"))
    pub.observe(events)
    assert not pub.due()
    clock.t += 0.25
    assert pub.due()
    batch = pub.compute()
    assert batch is not None
    by_user = {w.slate.user_id: w for w in batch.slates}
    newbie = by_user["newbie"]
    assert newbie.policy == "cold_start"
    assert newbie.slate.model_version == NO_MODEL_VERSION
    assert len(newbie.slate.items) == 5
    assert all(0 < i.propensity <= 1 for i in newbie.slate.items)
    # Boltzmann over log(1 + positives): "hit" (30 positives) leads with p = 31 / (31 + 20);
    # fans never get it back (consumed).
    cold = [w for w in batch.slates if w.slate.user_id.startswith("x")]
    firsts = [w.slate.items[0] for w in cold]
    p = 31 / 51
    assert all(i.propensity == pytest.approx(p) for i in firsts if i.item_id == "hit")
    share = sum(i.item_id == "hit" for i in firsts) / len(firsts)
    assert abs(share - p) < 5 * (p * (1 - p) / len(firsts)) ** 0.5
    assert all("hit" not in {i.item_id for i in by_user[f"fan{n}"].slate.items} for n in range(30))
    assert batch.cold_start is not None
    assert batch.popularity == {"hit": 30}
    pub.committed(batch)
    assert not pub.pending
    assert not pub.due()


def test_model_slates_exclude_history_and_score_with_the_model(tmp_path):
    path = make_checkpoint(tmp_path, 7, ITEMS)
    cfg = PublisherConfig(k=5, history_len=10, exploration="greedy", device="cpu")
    model = load_serving_model(path, cfg.policy_kwargs())
    pub = Publisher(cfg, lambda: model)
    pub.observe([ev(1, "u", "m3"), ev(2, "u", "m9"), ev(3, "u", "not-in-model")])
    batch = pub.compute()
    assert batch is not None
    (w,) = batch.slates
    assert w.policy == "model"
    assert w.slate.model_version == "v000000000007"
    got = [i.item_id for i in w.slate.items]
    assert not {"m3", "m9"} & set(got)
    net, ids, _ = load_policy(path)
    logits = policy_scores(net, [[ids.index("m3"), ids.index("m9")]])[0]
    logits[[ids.index("m3"), ids.index("m9")]] = -torch.inf
    assert got == [ids[i] for i in logits.topk(5).indices.tolist()]
    for item in w.slate.items:
        assert item.score == pytest.approx(logits[ids.index(item.item_id)].item(), abs=1e-4)
        assert item.propensity == 1.0
    assert w.event_ts == 1_700_000_000_001


def test_cold_start_model_serves_users_without_history_from_the_new_user_state(tmp_path):
    """cold_start="model": a user who only skipped gets the model's begin-token ranking, their
    watched item excluded, and so does the slate for users never seen."""
    path = make_checkpoint(tmp_path, 7, ITEMS)
    cfg = PublisherConfig(
        k=5, history_len=10, exploration="greedy", device="cpu", cold_start="model"
    )
    model = load_serving_model(path, cfg.policy_kwargs())
    pub = Publisher(cfg, lambda: model)
    pub.observe([ev(1, "u", "m3", "skip")])
    batch = pub.compute()
    assert batch is not None
    (w,) = batch.slates
    assert w.policy == "model"
    net, ids, _ = load_policy(path)
    logits = policy_scores(net, [[]])[0]
    expected = [ids[i] for i in logits.topk(6).indices.tolist() if ids[i] != "m3"][:5]
    assert [i.item_id for i in w.slate.items] == expected
    assert batch.cold_start is not None
    assert [i.item_id for i in batch.cold_start.items] == [
        ids[i] for i in logits.topk(5).indices.tolist()
    ]
    # The default keeps the popularity policy for the same user.
    pop = Publisher(replace(cfg, cold_start="popularity"), lambda: model)
    pop.observe([ev(1, "u", "m3", "skip")])
    popular = pop.compute()
    assert popular is not None
    assert popular.slates[0].policy == "cold_start"


def test_user_states_in_length_buckets_equal_one_padded_batch(tmp_path):
    # The serving path sorts users by history length and trims each chunk's padding; every
    # user must get exactly the state the learner's own scoring computes from the full width.
    model = load_serving_model(make_checkpoint(tmp_path, 3, ITEMS), {"device": "cpu"})
    gen = torch.Generator().manual_seed(0)
    histories = [
        torch.randint(0, len(ITEMS), (int(n),), generator=gen).tolist()
        for n in torch.randint(0, 11, (23,), generator=gen)
    ]
    items, _ = pad_histories(histories, model.max_history)
    bucketed = model.user_states(items, chunk=4)
    with torch.inference_mode():
        one_batch = model._net.user_state(items, model._item_vecs)
    assert torch.allclose(bucketed, one_batch, atol=1e-5)
    assert not torch.allclose(bucketed[0], bucketed[1])  # users really differ


def test_new_version_refreshes_every_known_user_in_chunks(tmp_path):
    make_checkpoint(tmp_path, 1, ITEMS)
    watcher = ModelWatcher(tmp_path, lambda p: load_serving_model(p, {"device": "cpu"}))
    assert watcher.poll()
    pub, clock = make_publisher(lambda: watcher.current, refresh_batch_users=4)
    pub.observe([ev(n, f"u{n}", ITEMS[n % 40]) for n in range(10)])
    clock.t += 1
    first = pub.compute()
    assert first is not None
    assert {w.slate.model_version for w in first.slates} == {"v000000000001"}
    assert len(first.slates) == 10
    pub.committed(first)
    assert not pub.due()

    make_checkpoint(tmp_path, 2, ITEMS, seed=1)
    assert watcher.poll()
    assert pub.due()
    seen: set[str] = set()
    pub.observe([ev(50, "late", "m1")])  # a dirty user during the refresh goes first
    while pub.due():
        batch = pub.compute()
        assert batch is not None
        assert {w.slate.model_version for w in batch.slates} == {"v000000000002"}
        assert len(batch.slates) <= 4 + 1
        seen |= {w.slate.user_id for w in batch.slates}
        pub.committed(batch)
    assert seen == {f"u{n}" for n in range(10)} | {"late"}


def test_watcher_skips_tampered_and_partial_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 1, ITEMS)
    good = make_checkpoint(tmp_path, 2, ITEMS)
    bad = make_checkpoint(tmp_path, 3, ITEMS)
    (bad / "model.safetensors").write_bytes(b"tampered")
    partial = tmp_path / "v000000000004"
    shutil.copytree(good, partial)
    (partial / "manifest.json").unlink()
    watcher = ModelWatcher(tmp_path, lambda p: load_serving_model(p, {"device": "cpu"}))
    assert watcher.poll()
    assert watcher.current is not None
    assert watcher.current.version == "v000000000002"
    assert not watcher.poll()  # nothing newer that verifies: keep serving v2


def test_watcher_swaps_in_the_background(tmp_path):
    make_checkpoint(tmp_path, 1, ITEMS)
    watcher = ModelWatcher(
        tmp_path, lambda p: load_serving_model(p, {"device": "cpu"}), interval_s=0.05
    )
    watcher.poll()
    watcher.start()
    try:
        make_checkpoint(tmp_path, 5, ITEMS)
        import time

        deadline = time.monotonic() + 20
        while watcher.current.version != "v000000000005" and time.monotonic() < deadline:
            assert watcher.current is not None  # never a gap
            time.sleep(0.02)
        assert watcher.current.version == "v000000000005"
    finally:
        watcher.stop()


def _store_batch(pub: Publisher, store: Store, clock: Clock) -> None:
    """Compute and store every due batch, as the sink does after the slates are acknowledged."""
    clock.t += 1
    while (batch := pub.compute()) is not None:
        store.save_batch(batch.slates, states=batch.states, popularity=batch.popularity)
        pub.committed(batch)
        if not pub.refreshing and not pub.pending:
            break


def test_restore_then_reread_changes_nothing(tmp_path):
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        pub, clock = make_publisher(store=store)
        events = [ev(n, f"u{n % 3}", ITEMS[n]) for n in range(12)]
        pub.observe(events, [0] * len(events))
        _store_batch(pub, store, clock)

        again, _ = make_publisher(store=store)
        again.load_popularity(store.load_popularity())
        again.observe(events, [0] * len(events))  # the uncommitted tail is re-read after a crash
        assert not again.pending
        for u in ("u0", "u1", "u2"):
            mine = [again.item_ids[i] for i in again.histories.get(u)]
            assert mine == [pub.item_ids[i] for i in pub.histories.get(u)]
        pop = {i: again._popularity[again._item_index[i]] for i in ITEMS[:12]}
        assert pop == dict.fromkeys(ITEMS[:12], 1)
        assert sum(again._popularity) == 12


def test_evicted_user_is_reloaded_with_full_history_and_watched_items(tmp_path):
    # max_users=2: "u" is pushed out by other users, then comes back. Their next slate is the one
    # a publisher that never evicted anyone computes: same history, same exclusions.
    path = make_checkpoint(tmp_path, 7, ITEMS)
    cfg = {"exploration": "greedy", "history_len": 4}
    model = load_serving_model(path, PublisherConfig(**cfg).policy_kwargs())
    events = [ev(n, "u", f"m{n}") for n in range(1, 7)]  # 6 clicks: history keeps the last 4
    events += [ev(7, "u", "m20", "rating", value=1.0), ev(8, "u", "m21", "skip")]
    events += [ev(100 + n, f"other{n}", f"m{30 + n}") for n in range(5)]
    comeback = [Event("back", "impression", "u", "m39", 1_700_000_001_000)]
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        small, clock = make_publisher(lambda: model, store=store, max_users=2, **cfg)
        evictions = small._users.evictions
        small.observe(events, [0] * len(events))
        _store_batch(small, store, clock)
        assert small._peek("u") is None, "u should have been evicted"
        assert small._users.evictions > evictions
        assert small.users_in_memory <= 2
        small.observe(comeback, [0])
        clock.t += 1
        batch = small.compute()
        assert batch is not None
        (got,) = [w for w in batch.slates if w.slate.user_id == "u"]

    big, big_clock = make_publisher(lambda: model, **cfg)
    big.observe(events + comeback, [0] * (len(events) + 1))
    big_clock.t += 1
    ref_batch = big.compute()
    assert ref_batch is not None
    (ref,) = [w for w in ref_batch.slates if w.slate.user_id == "u"]
    assert [small.item_ids[i] for i in small.histories.get("u")] == ["m3", "m4", "m5", "m6"]
    assert [i.item_id for i in got.slate.items] == [i.item_id for i in ref.slate.items]
    watched = {f"m{n}" for n in range(1, 7)} | {"m20", "m21"}
    assert not watched & {i.item_id for i in got.slate.items}
    assert got.policy == "model"


def test_a_user_evicted_before_their_batch_is_stored_is_not_lost(tmp_path):
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        pub, clock = make_publisher(store=store, max_users=1)
        pub.observe([ev(1, "a", "m1"), ev(2, "b", "m2"), ev(3, "c", "m3")], [0, 0, 0])
        assert pub.users_in_memory == 3  # two wait, evicted, until their batch is stored
        _store_batch(pub, store, clock)
        assert pub.users_in_memory == 1
        rows = store.load_user_states(["a", "b", "c"])
        assert {u: [e[1] for e in r.entries] for u, r in rows.items()} == {
            "a": ["m1"],
            "b": ["m2"],
            "c": ["m3"],
        }


def test_rating_stats_survive_eviction(tmp_path):
    rules = RewardRules(rating_centre="user", rating_mean=3.0, rating_prior_count=1.0)
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        cfg = PublisherConfig(k=5, history_len=10, seed=0, device="cpu", max_users=1)
        pub = Publisher(cfg, lambda: None, rules, store=store)
        clock = Clock()
        pub._mono = clock  # type: ignore[method-assign]
        first = [ev(1, "u", "m1", "rating", value=5.0), ev(2, "u", "m2", "rating", value=5.0)]
        pub.observe(first, [3, 3])
        _store_batch(pub, store, clock)
        pub.observe([ev(3, "v", "m3")], [3])  # evicts u
        _store_batch(pub, store, clock)
        assert pub._peek("u") is None
        # The user's mean is now (3 + 5 + 5) / 3: a 4-star rating is below it, not positive.
        pub.observe([ev(4, "u", "m4", "rating", value=4.0)], [3])
        st = pub._peek("u")
        assert st is not None
        assert (st.rating_n, st.rating_sum) == (3, 14.0)
        assert [pub.item_ids[i] for i in pub.histories.get("u")] == ["m1", "m2"]
        assert st.partition == 3


def test_new_version_refreshes_only_the_owned_partitions_users(tmp_path):
    make_checkpoint(tmp_path / "ckpt", 1, ITEMS)
    watcher = ModelWatcher(tmp_path / "ckpt", lambda p: load_serving_model(p, {"device": "cpu"}))
    assert watcher.poll()
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        one, clock = make_publisher(lambda: watcher.current, store=store, refresh_batch_users=3)
        one.assign([0, 1])
        events = [ev(n, f"u{n}", ITEMS[n]) for n in range(10)]
        one.observe(events, [n % 2 for n in range(10)])
        _store_batch(one, store, clock)

        # A second replica takes partition 1 over; the first keeps 0.
        one.revoke([1])
        assert one.users_in_memory == 5
        two, clock2 = make_publisher(lambda: watcher.current, store=store, refresh_batch_users=3)
        two.assign([1])
        assert not two.pending
        batch = two.compute()  # the users of partition 1 have slates of this version already
        assert batch is not None
        assert batch.users == []
        two.committed(batch)

        make_checkpoint(tmp_path / "ckpt", 2, ITEMS, seed=1)
        assert watcher.poll()
        refreshed: dict[str, set[str]] = {"one": set(), "two": set()}
        for name, pub, clk in (("one", one, clock), ("two", two, clock2)):
            clk.t += 1
            while pub.due():
                batch = pub.compute()
                if batch is None:
                    break
                assert len(batch.slates) <= 3
                store.save_batch(batch.slates, states=batch.states)
                pub.committed(batch)
                refreshed[name] |= {w.slate.user_id for w in batch.slates}
        assert refreshed["one"] == {f"u{n}" for n in range(0, 10, 2)}
        assert refreshed["two"] == {f"u{n}" for n in range(1, 10, 2)}
        stored = store.all_recommendations()
        assert {stored[f"u{n}"].slate.model_version for n in range(10)} == {"v000000000002"}


def test_popularity_from_the_store_adds_what_other_replicas_counted(tmp_path):
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        one, clock = make_publisher(store=store)
        two, clock2 = make_publisher(store=store)
        one.observe([ev(n, f"a{n}", "hit") for n in range(3)], [0, 0, 0])
        _store_batch(one, store, clock)
        two.observe([ev(10, "b", "hit"), ev(11, "b", "other")], [1, 1])  # not stored yet
        two.load_popularity(store.load_popularity())
        assert two._popularity[two._item_index["hit"]] == 4
        assert two._popularity[two._item_index["other"]] == 1
        _store_batch(two, store, clock2)
        two.load_popularity(store.load_popularity())
        assert two._popularity[two._item_index["hit"]] == 4
        assert store.load_popularity() == {"hit": 4, "other": 1}


def test_revoked_users_unstored_changes_are_dropped_with_them(tmp_path):
    # What the next owner re-reads must not also be stored by the old one: dirty flags (even
    # of a user evicted from memory) and popularity counts go with the partition.
    with Store(f"sqlite:///{tmp_path / 's.db'}") as store:
        pub, clock = make_publisher(store=store, max_users=1)
        pub.assign([0, 1])
        pub.observe([ev(1, "mine", "m1")], [0])
        _store_batch(pub, store, clock)
        pub.observe([Event("imp", "impression", "mine", "m2", 1_700_000_000_500)], [0])
        pub.observe([ev(2, "theirs", "m1"), ev(3, "theirs", "m3")], [1, 1])
        assert pub._peek("mine") is None  # evicted, but still due for a slate
        pub.revoke([0, 1])
        assert not pub.pending
        assert pub._popularity[pub._item_index["m1"]] == 1
        assert pub._popularity[pub._item_index["m3"]] == 0
        clock.t += 1
        batch = pub.compute()
        assert batch is not None
        assert batch.users == []
        assert batch.popularity == {}
        assert batch.states == []


def test_item_table_is_bounded_and_counted():
    pub, _ = make_publisher(max_items=3)
    pub.observe([ev(n, "u", f"m{n}") for n in range(5)])
    assert pub.item_ids == ["m0", "m1", "m2"]
    assert [pub.item_ids[i] for i in pub.histories.get("u")] == ["m0", "m1", "m2"]
    gauge = metrics.CACHE_ENTRIES.labels(cache="publisher_items")
    assert gauge._value.get() == 3


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"k": 0}, "k"),
        ({"history_len": 0}, "history_len"),
        ({"temperature": 0}, "temperature"),
        ({"epsilon": 2}, "epsilon"),
        ({"exploration": "thompson"}, "exploration"),
        ({"batch_interval_s": -1}, "batch_interval_s"),
        ({"max_users": 0}, "max_users"),
        ({"max_items": 0}, "max_items"),
        ({"cooldown_s": -1}, "cooldown_s"),
        ({"shown_len": 0}, "shown_len"),
    ],
)
def test_bad_config_names_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PublisherConfig(**kwargs)


def test_one_engaged_impression_is_one_history_entry():
    # Click, dwell and purchase of one impression (same request_id and item): one entry. The
    # same item engaged again from another slate is a new entry.
    pub, _ = make_publisher()
    t = 1_700_000_000_000
    events = [Event("i1", "impression", "u", "a", t, "r1", 0, 0.5)]
    events += [
        Event(f"f{n}", kind, "u", "a", t + n, "r1", 0, value=value)
        for n, (kind, value) in enumerate([("click", None), ("dwell", 30.0), ("purchase", None)])
    ]
    events.append(Event("f9", "click", "u", "a", t + 100, "r2", 0))
    pub.observe(events)
    assert [pub.item_ids[i] for i in pub.histories.get("u")] == ["a", "a"]
    st = pub._peek("u")
    assert st is not None
    assert len(st.entries) == 2


def test_watched_items_are_never_shown_again_even_when_disliked():
    # A low rating and a skip are not history (not positive) but the item was watched:
    # neither the cold-start nor the model path may show it again.
    pub, clock = make_publisher(k=5)
    pub.observe([ev(n, f"fan{n}", f"m{n % 8}") for n in range(40)])
    pub.observe([ev(100, "u", "m1", "rating", value=1.0), ev(101, "u", "m2", "skip")])
    assert pub.histories.get("u") == []
    clock.t += 1
    for _ in range(30):
        batch = pub.compute()
        assert batch is not None
        (w,) = [w for w in batch.slates if w.slate.user_id == "u"] or [None]
        if w is not None:
            assert not {"m1", "m2"} & {i.item_id for i in w.slate.items}
        pub.committed(batch)
        pub.observe([Event(f"imp{_}", "impression", "u", "m5", 1_700_000_000_500 + _)])


@pytest.mark.slow
def test_cold_start_propensity_is_the_empirical_first_draw_frequency():
    # Cold start logs the single-draw Boltzmann probability over log(1 + positives), over the
    # items the user may see: every item's frequency of being drawn first matches it, and it is
    # the same number at any slot.
    pub, _ = make_publisher(k=3)
    counts = {"a": 9, "b": 4, "c": 1, "d": 0, "e": 0}
    n = 0
    for item, c in counts.items():
        for _ in range(c):
            n += 1
            pub.observe([ev(n, f"fan{n}", item)])
        pub._intern(item)
    pub.observe([ev(1000, "u", "b", "rating", value=1.0)])  # u watched b: not allowed for u
    universe, ranking = pub._cold_rank(None, [[pub._item_index["b"]]] * 20_000)
    assert ranking is not None
    weights = {i: 1 + c for i, c in counts.items() if i != "b"}
    total = sum(weights.values())
    items = ranking.items.numpy()
    props = ranking.propensities.numpy()
    for item, w in weights.items():
        j = universe.index(item)
        p = w / total
        assert props[items == j] == pytest.approx(p)
        freq = (items[:, 0] == j).mean()
        assert abs(freq - p) < 5 * (p * (1 - p) / len(items)) ** 0.5
    assert not (items == universe.index("b")).any()


def test_drift_exploration_factor_from_the_model_version_scales_temperature(tmp_path):
    from recsys.publisher.core import exploration_factor

    assert exploration_factor({}) == 1.0
    assert exploration_factor({"extra": {"exploration_factor": 2.5}}) == 2.5
    assert exploration_factor({"extra": {"exploration_factor": "x"}}) == 1.0
    assert exploration_factor({"extra": {"exploration_factor": 0.1}}) == 1.0
    path = make_checkpoint(tmp_path, 7, ITEMS)
    cfg = PublisherConfig(k=5, history_len=10, temperature=0.5, device="cpu")
    model = load_serving_model(path, cfg.policy_kwargs())
    model.manifest.setdefault("extra", {})["exploration_factor"] = 3.0
    pub = Publisher(cfg, lambda: model)
    pub.observe([ev(1, "u", "m3")])
    assert pub.compute() is not None
    assert model.policy.temperature == pytest.approx(1.5)


def test_the_sink_replaces_a_wedged_producer_and_fails_the_batch(tmp_path):
    from kafka.consumer.fetcher import ConsumerRecord
    from kafka.errors import KafkaTimeoutError

    from recsys.kafka import DeadLetterWriter
    from recsys.publisher.sink import PublisherSink

    class Acked:
        def get(self, timeout=None):
            return None

    class Producer:
        def __init__(self, wedged: bool) -> None:
            self.wedged, self.closed, self.sent = wedged, False, 0

        def send(self, *args, **kwargs):
            self.sent += 1
            return Acked()

        def flush(self, timeout=None):
            if self.wedged:
                raise KafkaTimeoutError(f"flush not done in {timeout}s")

        def close(self, timeout=None):
            self.closed = True

    wedged, fresh = Producer(True), Producer(False)
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    publisher = Publisher(PublisherConfig(batch_interval_s=0.0, device="cpu"), lambda: None)
    dlq = DeadLetterWriter(wedged, "dlq", "publisher")
    sink = PublisherSink(publisher, wedged, "recs", store, dlq=dlq, new_producer=lambda: fresh)
    event = Event("e1", "click", "u1", "m1", 1_700_000_000_000)
    record = ConsumerRecord("ev", 0, -1, 0, 0, 0, None, event.to_bytes(), [], None, -1, -1, -1)
    sink.write([record])
    with pytest.raises(KafkaTimeoutError):
        sink.flush()  # the loop hands the partition back; nothing of the batch is stored
    assert wedged.closed
    assert sink.producer is fresh
    assert dlq.producer is fresh
    assert store.get_recommendation("u1") is None
    store.close()


def test_model_slates_carry_each_users_reward_head_factor(tmp_path):
    """Two users with the same history get the ranking of their own serving scores: the
    publisher passes each user's reward-head bucket, not just the history."""
    learner = tiny_learner(0)
    for i in ITEMS:
        learner.catalog.index_of(i)
    with torch.no_grad():
        head = learner.model.reward_head
        head.users.copy_(torch.randn_like(head.users))
    path = learner.save_checkpoint(tmp_path, offsets={})
    cfg = PublisherConfig(k=5, history_len=10, exploration="greedy", device="cpu")
    model = load_serving_model(path, cfg.policy_kwargs())
    pub = Publisher(cfg, lambda: model)
    pub.observe([ev(1, "u", "m3"), ev(2, "v", "m3")])
    batch = pub.compute()
    assert batch is not None
    got = {w.slate.user_id: [i.item_id for i in w.slate.items] for w in batch.slates}
    net, ids, _ = load_policy(path)
    for user in ("u", "v"):
        bucket = torch.tensor([user_bucket(user, net.cfg.user_buckets)])
        logits = policy_scores(net, [[ids.index("m3")]], bucket)[0]
        logits[ids.index("m3")] = -torch.inf
        assert got[user] == [ids[i] for i in logits.topk(5).indices.tolist()]
    assert got["u"] != got["v"]


def test_items_shown_stay_out_of_the_users_slates_for_the_cooldown():
    pub, clock = make_publisher(k=5, cooldown_s=60.0)
    pub._clock = clock  # type: ignore[method-assign]  # slates are built at the clock's time
    pub.observe([ev(n, f"fan{n}", f"m{n % 20}") for n in range(40)])
    t = int(clock.t * 1000)
    shown = ["m1", "m2", "m3", "m4", "m5"]
    pub.observe([Event(f"imp{n}", "impression", "u", i, t, "r1", n) for n, i in enumerate(shown)])
    assert sorted(pub.item_ids[i] for i in pub.not_allowed("u", t)) == shown
    for _ in range(20):
        batch = pub.compute()
        assert batch is not None
        (w,) = [w for w in batch.slates if w.slate.user_id == "u"]
        assert not set(shown) & {i.item_id for i in w.slate.items}
        assert len(w.slate.items) == 5
        pub.committed(batch)
        pub.observe([ev(1000 + _, f"fan{_}", "m9")])
        pub._dirty["u"] = t  # ask for u's slate again
    clock.t += 61
    assert pub.not_allowed("u", int(clock.t * 1000)) == []
    off, _ = make_publisher(k=5)
    off.observe([Event("imp", "impression", "u", "m1", t, "r1", 0)])
    assert off.not_allowed("u", t) == []
