"""MovieLens loader: the three layouts, time order with stable ties, malformed rows reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys import datasets
from recsys.data.movielens import detect_layout, load_movielens
from recsys.errors import DataError
from recsys.events import EventParser

DATA = datasets.path("ml-latest-small").parent  # packaged: ml-latest-small/, obd/random/all/


def _write(path: Path, text: str, encoding: str = "utf-8") -> None:
    path.write_bytes(text.encode(encoding))


@pytest.fixture
def ml100k(tmp_path: Path) -> Path:
    d = tmp_path / "ml-100k"
    d.mkdir()
    _write(
        d / "u.data",
        "196\t242\t3\t881250949\n"
        "186\t302\t3\t891717742\n"
        "22\t377\t1\t878887116\n"
        "oops\t1\t2\t3\n"  # line 4: non-integer user
        "244\t51\t2\t880606923\n"
        "166\t346\t1\n"  # line 6: three fields
        "22\t242\t5\t878887116\n",  # tie with line 3: must stay after it
    )
    flags = ["0"] * 19
    comedy = flags.copy()
    comedy[5] = "1"
    comedy[3] = "1"
    unknown = flags.copy()
    unknown[0] = "1"
    _write(
        d / "u.item",
        "242|Kolya (1996)|24-Jan-1997||http://us.imdb.com/x|" + "|".join(comedy) + "\n"
        "302|L.A. Confidential (1997)|01-Jan-1997||url|" + "|".join(unknown) + "\n"
        "377|Heavyweights (1994)|01-Jan-1994||url|1|0\n"  # line 3: too few flags
        "51|Légends of the Fall (1994)|01-Jan-1994||url|" + "|".join(flags) + "\n",
        encoding="latin-1",
    )
    return d


@pytest.fixture
def ml1m(tmp_path: Path) -> Path:
    d = tmp_path / "ml-1m"
    d.mkdir()
    _write(
        d / "ratings.dat",
        "1::1193::5::978300760\n"
        "1::661::3::978302109\n"
        "2::1193::nan::978300761\n"  # line 3: non-finite rating
        "2::3068::4::978299000\n"
        "\n"
        "3::661::4.5::978300760\n",
        encoding="latin-1",
    )
    _write(
        d / "movies.dat",
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "3068::Verdict, The (1982)::Drama\n"
        "broken line\n"
        "9999::Señor Film (2000)::(no genres listed)\n",
        encoding="latin-1",
    )
    return d


def test_detect_layout(ml100k: Path, ml1m: Path, tmp_path: Path) -> None:
    assert detect_layout(ml100k) == "ml-100k"
    assert detect_layout(ml1m) == "ml-1m"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"ratings\.csv"):
        detect_layout(empty)
    with pytest.raises(DataError, match="not a directory"):
        detect_layout(tmp_path / "missing")


def test_ml100k_layout(ml100k: Path) -> None:
    ml = load_movielens(ml100k)
    assert ml.layout == "ml-100k"
    events = list(ml.events())
    assert [(e.user_id, e.item_id, e.ts) for e in events] == [
        ("22", "377", 878887116000),
        ("22", "242", 878887116000),
        ("244", "51", 880606923000),
        ("196", "242", 881250949000),
        ("186", "302", 891717742000),
    ]
    assert all(e.type == "rating" for e in events)
    assert [e.value for e in events] == [1.0, 5.0, 2.0, 3.0, 3.0]
    assert events[0].event_id == "ml:22:377:878887116000"
    assert [(s.file, s.line) for s in ml.report.skipped] == [
        ("u.data", 4),
        ("u.data", 6),
        ("u.item", 3),
    ]
    movies = {m.item_id: m for m in ml.movies}
    assert set(movies) == {"242", "302", "51"}
    assert movies["242"].tags == ("Animation", "Comedy")
    assert movies["302"].tags == ()  # the "unknown" genre is not a tag
    assert movies["51"].title == "Légends of the Fall (1994)"
    # A movie's catalogue time is its first rating; ts in ms.
    assert movies["242"].ts == 878887116000


def test_ml100k_reads_u_genre(ml100k: Path) -> None:
    names = ["unknown", *(f"G{i}" for i in range(1, 19))]
    _write(ml100k / "u.genre", "".join(f"{n}|{i}\n" for i, n in enumerate(names)) + "\n")
    movies = {m.item_id: m for m in load_movielens(ml100k).movies}
    assert movies["242"].tags == ("G3", "G5")


def test_ml1m_layout(ml1m: Path) -> None:
    ml = load_movielens(ml1m)
    assert ml.layout == "ml-1m"
    assert [(e.user_id, e.item_id, e.value) for e in ml.events()] == [
        ("2", "3068", 4.0),
        ("1", "1193", 5.0),
        ("3", "661", 4.5),  # same second as the row above it in the file, so after it
        ("1", "661", 3.0),
    ]
    assert [(s.file, s.line) for s in ml.report.skipped] == [("ratings.dat", 3), ("movies.dat", 4)]
    movies = {m.item_id: m for m in ml.movies}
    assert movies["661"].tags == ("Animation", "Children's", "Musical")
    assert movies["9999"].tags == ()
    assert movies["9999"].title == "Señor Film (2000)"
    # Never rated: it enters the catalogue at the data set's first timestamp.
    assert movies["9999"].ts == 978299000000


def test_ml_latest_csv_quotes_and_bad_rows(tmp_path: Path) -> None:
    d = tmp_path / "ml-latest"
    d.mkdir()
    _write(
        d / "ratings.csv",
        "userId,movieId,rating,timestamp\n1,11,4.0,964982703\n1,12,x,964982704\n2,11,3.5,5\n",
    )
    _write(
        d / "movies.csv",
        "movieId,title,genres\n"
        '11,"American President, The (1995)",Comedy|Drama|Romance\n'
        '12,"Film ""Quoted"" (2001)",Drama\n'
        "13,no genres column\n",
    )
    ml = load_movielens(d)
    assert ml.layout == "ml-latest"
    assert [(s.file, s.line) for s in ml.report.skipped] == [("ratings.csv", 3), ("movies.csv", 4)]
    assert [e.ts for e in ml.events()] == [5000, 964982703000]
    titles = [m.title for m in ml.movies]
    assert titles == ["American President, The (1995)", 'Film "Quoted" (2001)']


def test_events_pass_the_contract(ml1m: Path) -> None:
    parser = EventParser(clock_ms=lambda: 2_000_000_000_000)
    ml = load_movielens(ml1m)
    for i, event in enumerate(ml.events()):
        assert parser.parse(event.to_bytes()) == event
        assert ml.event(i) == event


def test_ml_latest_small_real_data() -> None:
    ml = load_movielens(DATA / "ml-latest-small")
    assert ml.layout == "ml-latest"
    assert len(ml) == 100_836
    assert len(ml.movies) == 9_742
    assert len(np.unique(ml.user)) == 610
    assert ml.report.skipped == []
    assert np.all(np.diff(ml.ts_ms) >= 0)
    ids = [e.event_id for e in ml.events()]
    assert len(set(ids)) == len(ids)
    titles = {m.item_id: m for m in ml.movies}
    assert titles["11"].title == "American President, The (1995)"
    assert titles["1"].tags == ("Adventure", "Animation", "Children", "Comedy", "Fantasy")
