"""Open Bandit Dataset loader: arrays for OPE, impression and click events, bad rows reported."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from recsys import datasets
from recsys.data.obd import load_obd, obd_items
from recsys.errors import DataError
from recsys.events import EventParser

DATA = datasets.path("ml-latest-small").parent  # packaged: ml-latest-small/, obd/random/all/
OBD = DATA / "obd" / "random" / "all"

_HEADER = (
    ",timestamp,item_id,position,click,propensity_score,user_feature_0,user_feature_1,"
    "user-item_affinity_0,user-item_affinity_1,user-item_affinity_2\n"
)


@pytest.fixture
def small_obd(tmp_path: Path) -> Path:
    d = tmp_path / "random" / "all"
    d.mkdir(parents=True)
    (d / "all.csv").write_text(
        _HEADER
        + "0,2019-11-24 00:00:01.500000+00:00,2,1,0,0.3333,ua,ub,0.0,1.0,0.0\n"
        + "1,2019-11-24 00:00:02+00:00,0,3,1,0.3333,ua,uc,0.0,0.0,0.0\n"
        + "2,2019-11-24 00:00:03+00:00,1,2,0,0,ua,ub,0.0,0.0,0.0\n"  # line 4: pscore 0
        + "3,not a time,1,2,0,0.5,ua,ub,0.0,0.0,0.0\n"  # line 5
        + "4,2019-11-24 00:00:04+00:00,1,2,1,0.5,ua,ub\n"  # line 6: short
        + "5,2019-11-24 00:00:05+00:00,1,2,1,0.5,ud,ub,0.0,2.0,0.0\n"
    )
    (d / "item_context.csv").write_text(
        ",item_id,item_feature_0,item_feature_1\n0,0,0.5,aa\n1,1,-1.0,bb\n2,2,0.0,aa\n"
    )
    return d


def test_small_log_arrays_and_skips(small_obd: Path) -> None:
    log = load_obd(small_obd)
    assert [(s.file, s.line) for s in log.report.skipped] == [
        ("all.csv", 4),
        ("all.csv", 5),
        ("all.csv", 6),
    ]
    assert log.n_rounds == 3
    assert log.action.tolist() == [2, 0, 1]
    assert log.position.tolist() == [0, 2, 1]  # 1-based in the file, 0-based here
    assert log.reward.tolist() == [0.0, 1.0, 1.0]
    assert log.ts_ms.tolist() == [1574553601500, 1574553602000, 1574553605000]
    assert log.behavior_policy == "random"
    # context = one-hot(user_feature_0: ua, ud) + one-hot(user_feature_1: ub, uc) + 3 affinities
    assert log.context.shape == (3, 7)
    np.testing.assert_array_equal(log.context[0], [1, 0, 1, 0, 0, 1, 0])
    # action_context = numeric feature then one-hot(aa, bb), rows ordered by item_id
    np.testing.assert_array_equal(log.action_context, [[0.5, 1, 0], [-1.0, 0, 1], [0.0, 1, 0]])
    # same user features → same derived user; different → different
    assert log.user_ids[0] != log.user_ids[1]
    assert log.user_ids[0].startswith("obd-u:")


def test_small_log_events(small_obd: Path) -> None:
    log = load_obd(small_obd)
    events = list(log.events())
    assert [(e.type, e.request_id) for e in events] == [
        ("impression", "obd:0:1574553601500"),
        ("impression", "obd:1:1574553602000"),
        ("click", "obd:1:1574553602000"),
        ("impression", "obd:5:1574553605000"),
        ("click", "obd:5:1574553605000"),
    ]
    parser = EventParser(clock_ms=lambda: 2_000_000_000_000)
    for e in events:
        assert parser.parse(e.to_bytes()) == e
    assert events[0].propensity == pytest.approx(0.3333)
    assert events[0].model_version == "obd-random"
    items = obd_items(log)
    assert [i.item_id for i in items] == ["0", "1", "2"]
    assert items[1].attributes == {"item_feature_0": "-1.0", "item_feature_1": "bb"}


def test_missing_column_and_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not a directory"):
        load_obd(tmp_path / "nope")
    (tmp_path / "x.csv").write_text(",timestamp,item_id\n0,2019-11-24 00:00:01+00:00,1\n")
    with pytest.raises(DataError, match="lacks columns"):
        load_obd(tmp_path)


def test_real_obd_sample() -> None:
    log = load_obd(OBD)
    assert log.n_rounds == 10_000
    assert log.report.skipped == []
    assert log.n_actions == 80
    assert log.len_list == 3
    assert int(log.reward.sum()) == 38
    np.testing.assert_allclose(log.pscore, 1 / 80)
    assert np.all(np.diff(log.ts_ms) >= 0)
    events = list(log.events())
    counts = Counter(e.type for e in events)
    assert counts == {"impression": 10_000, "click": 38}
    impressions = {e.request_id: e for e in events if e.type == "impression"}
    assert len(impressions) == 10_000
    for click in (e for e in events if e.type == "click"):
        imp = impressions[click.request_id]
        assert (imp.user_id, imp.item_id, imp.position) == (
            click.user_id,
            click.item_id,
            click.position,
        )
    assert len({e.event_id for e in events}) == len(events)
