"""Reward rules and the attribution-window join, example by example (no Kafka)."""

from __future__ import annotations

import sys

import pytest

from recsys.config import RewardSettings, load_settings
from recsys.errors import ConfigError
from recsys.events import Event, RewardRecord
from recsys.rewards import (
    RewardJoin,
    RewardRules,
    default_reward_id,
    encode_reward,
    feedback_reward_id,
    offline_join,
)

W, L, T = 1000, 100, 500


def imp(eid: str, ts: int, user: str = "u", item: str = "a", req: str | None = "r", **kw) -> Event:
    kw.setdefault("position", 1)
    kw.setdefault("propensity", 0.25)
    kw.setdefault("model_version", "m7")
    return Event(eid, "impression", user, item, ts, request_id=req, **kw)


def fb(
    eid: str,
    kind: str,
    ts: int,
    user: str = "u",
    item: str = "a",
    req: str | None = "r",
    value: float | None = None,
) -> Event:
    return Event(eid, kind, user, item, ts, request_id=req, value=value)


def join(**kw) -> RewardJoin:
    kw.setdefault("window_ms", W)
    kw.setdefault("allowed_lateness_ms", L)
    kw.setdefault("late_retention_ms", T)
    kw.setdefault("dedupe_horizon_ms", 300)
    return RewardJoin(**kw)


def feed(j: RewardJoin, events: list[Event]) -> list[RewardRecord]:
    out: list[RewardRecord] = []
    for e in events:
        out.extend(j.update(e))
    return out


# -- rules -----------------------------------------------------------------------------------------
def test_default_rule_values() -> None:
    r = RewardRules()
    assert r.value("click", None) == 1.0
    assert r.value("add_to_cart", None) == 2.0
    assert r.value("purchase", 129.0) == 5.0  # the price does not scale it
    assert r.value("skip", None) == pytest.approx(-0.2)
    assert r.value("dwell", 30.0) == pytest.approx(0.5)
    assert r.value("dwell", 600.0) == 1.0  # capped
    assert r.value("dwell", -5.0) == 0.0
    assert r.value("dwell", None) == 0.0
    assert r.value("rating", 4.5) == pytest.approx(1.5)  # centred on the global 3.0
    assert r.value("rating", None) == 0.0


def test_rule_values_stay_finite() -> None:
    r = RewardRules(weights={"rating": 5.0})
    assert r.value("rating", 1.7e308) == sys.float_info.max
    assert r.value("rating", -1.7e308) == -sys.float_info.max
    assert r.value("rating", 1e308, centre=-1e308) == sys.float_info.max
    assert RewardRules(weights={"rating": 0.0}).value("rating", 1e308, centre=-1e308) == 0.0
    assert RewardRules().value("dwell", 1e308) == 1.0


def test_rating_centres() -> None:
    assert RewardRules(rating_centre="none").value("rating", 4.0) == 4.0
    user = RewardRules(rating_centre="user", rating_mean=3.0, rating_prior_count=1.0)
    # Two earlier ratings 5 and 5 plus one pseudo-rating 3: centre 13/3.
    assert user.user_centre(2, 10.0) == pytest.approx(13 / 3)
    assert user.value("rating", 5.0, user.user_centre(2, 10.0)) == pytest.approx(5 - 13 / 3)
    assert RewardRules(rating_prior_count=0).user_centre(0, 0.0) == 3.0


def test_user_centre_in_the_join_uses_earlier_ratings_only() -> None:
    j = join(rules=RewardRules(rating_centre="user", rating_mean=3.0, rating_prior_count=1.0))
    out = feed(
        j, [fb("a", "rating", 1, req=None, value=5.0), fb("b", "rating", 2, req=None, value=5.0)]
    )
    assert [r.reward for r in out] == [pytest.approx(2.0), pytest.approx(1.0)]


def test_rules_validation_names_the_parameter() -> None:
    with pytest.raises(ValueError, match="weights"):
        RewardRules(weights={"hover": 1.0})
    with pytest.raises(ValueError, match="dwell_cap_s"):
        RewardRules(dwell_cap_s=0)
    with pytest.raises(ValueError, match="rating_centre"):
        RewardRules(rating_centre="median")
    with pytest.raises(ValueError, match="weights\\['click'\\]"):
        RewardRules(weights={"click": float("nan")})


def test_rules_from_toml_and_yaml(tmp_path) -> None:
    toml = tmp_path / "rules.toml"
    toml.write_text('dwell_cap_s = 10\nrating_centre = "none"\n[weights]\nclick = 2.5\n')
    r = RewardRules.from_file(toml)
    assert r.value("click", None) == 2.5
    assert r.value("purchase", None) == 5.0  # merged over the defaults
    assert r.value("dwell", 5.0) == 0.5
    assert r.rating_centre == "none"
    yml = tmp_path / "rules.yaml"
    yml.write_text("weights:\n  skip: -1\nrating_mean: 3.5\n")
    y = RewardRules.from_file(yml)
    assert y.value("skip", None) == -1.0
    assert y.value("rating", 4.5) == 1.0


def test_bad_rules_file_is_a_config_error(tmp_path) -> None:
    bad = tmp_path / "r.toml"
    bad.write_text("dwel_cap_s = 3\n")
    with pytest.raises(ConfigError, match="dwel_cap_s"):
        RewardRules.from_file(bad)
    broken = tmp_path / "r.yaml"
    broken.write_text("weights: [unclosed\n")
    with pytest.raises(ConfigError, match=r"r\.yaml"):
        RewardRules.from_file(broken)
    with pytest.raises(ConfigError, match=r"expected a \.toml"):
        RewardRules.from_file(tmp_path / "r.json")


def test_rules_from_settings_then_file(tmp_path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text("[weights]\npurchase = 9\n")
    s = RewardSettings(weights={"click": 3.0}, rules_file=f)
    r = RewardRules.from_settings(s)
    assert r.value("click", None) == 3.0
    assert r.value("purchase", None) == 9.0
    assert r.value("skip", None) == 0.0  # the settings' weights replace the defaults


def test_reward_settings_from_environment(monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_REWARDS__WINDOW_MS", "60000")
    monkeypatch.setenv("RECSYS_REWARDS__WEIGHTS", '{"click": 1, "purchase": 10}')
    s = load_settings()
    assert s.rewards.window_ms == 60000
    assert s.rewards.weights == {"click": 1.0, "purchase": 10.0}
    monkeypatch.setenv("RECSYS_REWARDS__WEIGHTS", '{"hover": 1}')
    with pytest.raises(ConfigError, match="RECSYS_REWARDS"):
        load_settings()


# -- the join --------------------------------------------------------------------------------------
def test_click_then_purchase_are_two_joined_records_and_no_default() -> None:
    j = join()
    out = feed(j, [imp("i", 0), fb("c", "click", 10), fb("p", "purchase", 50)])
    assert [(r.kind, r.reward) for r in out] == [("joined", 1.0), ("joined", 5.0)]
    c = out[0]
    assert c.reward_id == feedback_reward_id("c")
    assert (c.ts, c.propensity, c.position, c.model_version, c.request_id) == (
        0,
        0.25,
        1,
        "m7",
        "r",
    )
    assert feed(j, [fb("later", "click", 5000, item="zz")])[0].kind == "organic"
    assert j.open_windows == 0
    assert all(r.kind != "default" for r in out)


def test_default_when_the_window_closes_by_event_time() -> None:
    j = join()
    assert feed(j, [imp("i", 0)]) == []
    # The clock must pass ts + window + lateness; another user's event moves it.
    assert feed(j, [fb("x", "click", W + L - 1, user="v", item="b")])[0].kind == "organic"
    out = feed(j, [fb("y", "click", W + L, user="v", item="b")])
    assert [r.kind for r in out] == ["default", "organic"]
    d = out[0]
    assert d.reward_id == default_reward_id("i")
    assert d.reward == 0.0
    assert d.propensity == 0.25


def test_feedback_without_request_id_joins_the_latest_earlier_impression() -> None:
    j = join()
    out = feed(
        j,
        [
            imp("i1", 0, req="r1", position=0),
            imp("i2", 100, req="r2", position=2),
            imp("i3", 900, req="r3", position=4),  # after the click: not a candidate
            fb("c", "click", 150, req=None),
        ],
    )
    assert [(r.kind, r.request_id, r.position) for r in out] == [("joined", "r2", 2)]


def test_request_id_must_match_user_and_item() -> None:
    j = join()
    out = feed(j, [imp("i", 0), fb("c1", "click", 5, item="b"), fb("c2", "click", 5, user="v")])
    assert [r.kind for r in out] == ["organic", "organic"]
    assert [r.propensity for r in out] == [None, None]


@pytest.mark.parametrize(("rule", "kinds"), [("organic", ["organic"]), ("drop", [])])
def test_late_feedback_follows_the_late_rule(rule: str, kinds: list[str]) -> None:
    j = join(late_rule=rule)
    out = feed(j, [imp("i", 0), fb("c", "click", W + 10)])  # after the window, before T
    assert [r.kind for r in out if r.user_id == "u" and r.kind != "default"] == kinds
    assert j.late == 1


def test_feedback_beyond_late_retention_is_organic_not_late() -> None:
    j = join(late_rule="drop")
    out = feed(j, [imp("i", 0), fb("c", "click", W + T)])
    assert [r.kind for r in out] == ["default", "organic"]
    assert j.late == 0


def test_feedback_arriving_after_its_window_closed_is_late() -> None:
    j = join()
    out = feed(j, [imp("i", 0), fb("x", "click", W + L + 5, user="v"), fb("c", "click", 20)])
    assert [r.kind for r in out] == ["default", "organic", "organic"]
    assert j.late == 1


def test_duplicates_are_dropped_and_counted() -> None:
    j = join()
    out = feed(j, [imp("i", 0), imp("i", 0), fb("c", "click", 10), fb("c", "click", 10)])
    assert len(out) == 1
    assert j.duplicates == 2
    # An impression is recognised for as long as it is remembered, beyond the dedupe horizon.
    assert feed(j, [fb("z", "skip", 900, user="v"), imp("i", 0)]) == [
        RewardRecord(
            feedback_reward_id("z"),
            "v",
            "a",
            pytest.approx(-0.2),  # type: ignore[arg-type]
            900,
            "organic",
            request_id="r",
        )
    ]
    assert j.duplicates == 3


def test_state_expires_and_stays_bounded() -> None:
    j = join()
    for k in range(200):
        j.update(imp(f"i{k}", k * 10, user=f"u{k % 7}", req=f"r{k}"))
        j.update(fb(f"c{k}", "click", k * 10 + 5, user=f"u{k % 7}", req=f"r{k}"))
    assert j.open_windows > 0
    assert j.dedupe_entries > 0
    j.update(fb("end", "click", 10**6, user="x"))
    assert (j.open_windows, j.remembered_impressions, j.dedupe_entries) == (0, 0, 1)


def test_max_open_windows_closes_the_oldest_early() -> None:
    j = join(max_open_windows=2)
    out = feed(j, [imp("i1", 0, req="1"), imp("i2", 1, req="2"), imp("i3", 2, req="3")])
    assert [r.reward_id for r in out] == [default_reward_id("i1")]
    assert j.forced_closes == 1
    assert j.open_windows == 2


def test_max_dedupe_entries_forgets_the_oldest() -> None:
    j = join(max_dedupe_entries=2)
    feed(
        j,
        [
            fb("a", "click", 1, req=None),
            fb("b", "click", 2, req=None),
            fb("c", "click", 3, req=None),
        ],
    )
    assert j.dedupe_entries == 2
    assert len(feed(j, [fb("a", "click", 1, req=None)])) == 1  # forgotten: counted again


def test_safe_offset_holds_the_oldest_needed_record() -> None:
    j = join(dedupe_horizon_ms=0)
    assert j.safe_offset() is None
    j.update(fb("o", "click", 0, user="v", req=None), 10)
    assert j.safe_offset() == 10  # its clock
    j.update(imp("i", 5), 11)
    j.update(fb("o2", "click", 6, user="v", req=None), 12)
    assert j.safe_offset() == 11  # the open impression
    j.skip(13)  # a rejected record
    j.update(fb("o3", "click", W + L + T + 5, user="v", req=None), 14)  # i closed and forgotten
    assert j.safe_offset() == 14


def test_late_impression_is_replayed_from_before_the_clock_that_closed_it() -> None:
    """An impression arriving after its window closed (by an earlier event's clock) gets its
    default at once; a restart between that event and the impression would open it instead."""
    events = [
        fb("c", "click", 2000, user="v", req=None),  # sets the clock
        imp("i", 0),  # window over already: default at once
        fb("f", "click", 10),  # late for i
        fb("c2", "click", 2200, user="v", req=None),  # moves the clock on
    ]
    j = join(dedupe_horizon_ms=0, late_retention_ms=5000)
    out = []
    for off, e in enumerate(events):
        out += j.update(e, off)
    assert [r.kind for r in out] == ["organic", "default", "organic", "organic"]
    assert j.late == 1
    safe = j.safe_offset()
    assert safe == 0
    again = join(dedupe_horizon_ms=0, late_retention_ms=5000)
    replayed = []
    for off, e in enumerate(events[safe:], start=safe):
        replayed += again.update(e, off)
    assert replayed == out


def test_close_all_ends_every_window() -> None:
    j = join()
    feed(j, [imp("i1", 0, req="1"), imp("i2", 0, req="2"), fb("c", "click", 1, req="2")])
    assert [r.reward_id for r in j.close_all()] == [default_reward_id("i1")]
    assert j.open_windows == 0


@pytest.mark.parametrize(
    ("kw", "name"),
    [
        ({"window_ms": 0}, "window_ms"),
        ({"allowed_lateness_ms": -1}, "allowed_lateness_ms"),
        ({"late_retention_ms": 1.5}, "late_retention_ms"),
        ({"dedupe_horizon_ms": -1}, "dedupe_horizon_ms"),
        ({"max_open_windows": 0}, "max_open_windows"),
        ({"late_rule": "keep"}, "late_rule"),
    ],
)
def test_join_validation_names_the_parameter(kw: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RewardJoin(**kw)


def test_from_settings_takes_every_knob() -> None:
    s = RewardSettings(
        window_ms=5,
        allowed_lateness_ms=6,
        late_rule="drop",
        late_retention_ms=7,
        dedupe_horizon_ms=8,
        max_open_windows=9,
        max_dedupe_entries=10,
    )
    j = RewardJoin.from_settings(s)
    assert (
        j.window_ms,
        j.allowed_lateness_ms,
        j.late_rule,
        j.late_retention_ms,
        j.dedupe_horizon_ms,
        j.max_open_windows,
        j.max_dedupe_entries,
    ) == (5, 6, "drop", 7, 8, 9, 10)


def test_encode_reward_is_the_contract_json() -> None:
    for r in [
        RewardRecord("x" * 40, 'u"\\é', "i\n", 0.1 + 0.2, 12, "joined", 0.0125, 2, "m", "r"),
        RewardRecord("y" * 40, "u", "i", -0.2, 0, "organic"),
        RewardRecord("z" * 40, "u", "i", 5.0, 1, "default", 1.0, 0, None, None),
    ]:
        assert encode_reward(r) == r.to_bytes()
        assert RewardRecord.from_bytes(encode_reward(r)) == r


def test_oracle_small_example() -> None:
    events = [
        imp("i1", 0, req="1"),
        imp("i2", 0, req="2"),
        fb("c", "click", 5, req="2"),
        fb("l", "click", W + 1, req="1"),
        fb("o", "rating", 3, item="q", req=None, value=4.0),
    ]
    got = offline_join(events, window_ms=W, late_retention_ms=T)
    assert sorted((r.kind, r.reward) for r in got.values()) == [
        ("default", 0.0),
        ("joined", 1.0),
        ("organic", 1.0),
        ("organic", 1.0),
    ]
    assert offline_join(events, window_ms=W, late_retention_ms=T, late_rule="drop").keys() == (
        got.keys() - {feedback_reward_id("l")}
    )


# -- edge cases: late re-sends, skewed clocks ---------------------------------------------------
def test_an_impression_re_sent_after_it_was_forgotten_changes_nothing() -> None:
    j = join()
    first = feed(j, [imp("i", 0), fb("c", "click", 10)])
    assert [r.kind for r in first] == ["joined"]
    feed(j, [fb("x", "click", 5000, user="v", item="b", req=None)])  # forgets i (W+L+T < 5000)
    assert j.remembered_impressions == 0
    again = feed(j, [imp("i", 0)])  # the same impression, re-sent much later
    assert again == []  # no zero default contradicting the joined record
    assert j.late_impressions == 1
    # A late impression still inside its retention gets its default at once, as before.
    assert [r.kind for r in feed(j, [imp("k", 5000 - W - L - 10)])] == ["default"]


def test_a_client_stamping_events_ahead_cannot_close_other_windows_early() -> None:
    """The record timestamp caps the clock: an event 5 minutes ahead moves it only to its
    record's time, so the click that comes later still joins."""
    ahead = 5 * 60 * 1000
    capped, uncapped = join(), join()
    for j, cap in ((capped, 100), (uncapped, None)):
        j.update(imp("i", 0), 0, 0)
        j.update(fb("f", "click", ahead, user="v", item="b", req=None), 1, cap)
    assert capped.clock == 100
    assert capped.open_windows == 1
    assert uncapped.open_windows == 0  # the skewed event closed i's window
    got = capped.update(fb("c", "click", 500), 2, 500)
    assert [r.kind for r in got] == ["joined"]
