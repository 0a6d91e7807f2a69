"""MovieLens as events: ratings become ``rating`` events in time order, movies catalogue records.

Three layouts are recognised by the files in the folder (GroupLens ships them this way):

- ``ml-100k``: ``u.data`` (tab: user, item, rating, unix seconds) and ``u.item`` (pipe-separated,
  latin-1, 19 genre flags; genre names from ``u.genre`` when present);
- ``ml-1m`` (also ml-10m): ``ratings.dat`` and ``movies.dat`` (``::``-separated, latin-1);
- ``ml-latest`` (also ml-20m, ml-25m, ml-latest-small): ``ratings.csv`` and ``movies.csv``
  (CSV with a header, UTF-8; titles may hold commas and quotes).

Ratings are kept as numpy arrays (a 25M-row file would not fit as Python objects) sorted by
time with a stable sort, so ties keep their file order; :meth:`MovieLens.events` builds the
events lazily. A malformed row is skipped and recorded in :attr:`MovieLens.report`.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from recsys.data.load_report import LoadReport
from recsys.errors import DataError
from recsys.events import Event, ItemRecord

logger = logging.getLogger(__name__)

Layout = Literal["ml-100k", "ml-1m", "ml-latest"]

# Genre order of the 19 flags in ml-100k's u.item, used when u.genre is absent.
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_FILES: dict[Layout, tuple[str, str]] = {
    "ml-latest": ("ratings.csv", "movies.csv"),
    "ml-1m": ("ratings.dat", "movies.dat"),
    "ml-100k": ("u.data", "u.item"),
}


def detect_layout(path: str | Path) -> Layout:
    """Which MovieLens layout the folder holds; raises DataError naming the files looked for."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"MovieLens path {folder} is not a directory")
    for layout, (ratings, _) in _FILES.items():
        if (folder / ratings).is_file():
            return layout
    wanted = ", ".join(r for r, _ in _FILES.values())
    raise DataError(f"no MovieLens ratings file in {folder} (looked for {wanted})")


@dataclass(frozen=True)
class MovieLens:
    """A loaded MovieLens data set; rating arrays are in timestamp order (stable)."""

    path: Path
    layout: Layout
    user: np.ndarray  # int64 (n,)
    item: np.ndarray  # int64 (n,)
    rating: np.ndarray  # float64 (n,)
    ts_ms: np.ndarray  # int64 (n,), ms since the epoch, non-decreasing
    movies: tuple[ItemRecord, ...]
    report: LoadReport

    def __len__(self) -> int:
        return len(self.user)

    def event(self, i: int) -> Event:
        """The i-th rating (in time order) as an event; the id is stable across loads."""
        user, item, ts = int(self.user[i]), int(self.item[i]), int(self.ts_ms[i])
        return Event(
            event_id=f"ml:{user}:{item}:{ts}",
            type="rating",
            user_id=str(user),
            item_id=str(item),
            ts=ts,
            value=float(self.rating[i]),
        )

    def events(self) -> Iterator[Event]:
        """All ratings as ``rating`` events in timestamp order."""
        users, items, ts = self.user.tolist(), self.item.tolist(), self.ts_ms.tolist()
        for user, item, t, r in zip(users, items, ts, self.rating.tolist(), strict=True):
            yield Event(
                event_id=f"ml:{user}:{item}:{t}",
                type="rating",
                user_id=str(user),
                item_id=str(item),
                ts=t,
                value=r,
            )


def load_movielens(path: str | Path) -> MovieLens:
    """Load a MovieLens folder in any of the three layouts (detected from its files)."""
    folder = Path(path)
    layout = detect_layout(folder)
    ratings_name, movies_name = _FILES[layout]
    report = LoadReport()
    if layout == "ml-latest":
        rows = _read_csv_ratings(folder / ratings_name, report)
    else:
        sep, encoding = ("\t", "latin-1") if layout == "ml-100k" else ("::", "latin-1")
        rows = _read_delimited_ratings(folder / ratings_name, sep, encoding, report)
    user, item, rating, ts_s = rows
    # Stable: equal timestamps keep their file order, so a replay is reproducible.
    order = np.argsort(ts_s, kind="stable")
    user, item, rating = user[order], item[order], rating[order]
    ts_ms = ts_s[order] * 1000

    first_seen: dict[int, int] = {}
    # Reverse pass so the earliest timestamp wins without a branch per row.
    for it, t in zip(item[::-1].tolist(), ts_ms[::-1].tolist(), strict=True):
        first_seen[it] = t
    start = int(ts_ms[0]) if len(ts_ms) else 0
    movies_path = folder / movies_name
    if not movies_path.is_file():
        logger.warning("%s not found: no catalogue records", movies_path)
        movies: list[ItemRecord] = []
    elif layout == "ml-latest":
        movies = _read_csv_movies(movies_path, first_seen, start, report)
    elif layout == "ml-1m":
        movies = _read_dat_movies(movies_path, first_seen, start, report)
    else:
        movies = _read_100k_movies(movies_path, folder / "u.genre", first_seen, start, report)
    logger.info(
        "loaded %s (%s): %d ratings, %d movies, %d rows skipped",
        folder,
        layout,
        len(user),
        len(movies),
        len(report.skipped),
    )
    return MovieLens(folder, layout, user, item, rating, ts_ms, tuple(movies), report)


def _parse_rating(
    fields: list[str], name: str, line: int, report: LoadReport
) -> tuple[int, int, float, int] | None:
    if len(fields) != 4:
        report.skip(name, line, f"expected 4 fields, got {len(fields)}")
        return None
    try:
        user, item = int(fields[0]), int(fields[1])
        rating = float(fields[2])
        ts = int(fields[3])
    except ValueError as exc:
        report.skip(name, line, f"bad value: {exc}")
        return None
    if not math.isfinite(rating):
        report.skip(name, line, f"non-finite rating {fields[2]!r}")
        return None
    if ts < 0 or user < 0 or item < 0:
        report.skip(name, line, "negative id or timestamp")
        return None
    return user, item, rating, ts


_Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _to_arrays(users: list[int], items: list[int], ratings: list[float], ts: list[int]) -> _Arrays:
    return (
        np.asarray(users, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        np.asarray(ratings, dtype=np.float64),
        np.asarray(ts, dtype=np.int64),
    )


def _read_delimited_ratings(path: Path, sep: str, encoding: str, report: LoadReport) -> _Arrays:
    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    ts: list[int] = []
    with path.open(encoding=encoding, newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            report.rows_read += 1
            parsed = _parse_rating(line.split(sep), path.name, line_no, report)
            if parsed is not None:
                users.append(parsed[0])
                items.append(parsed[1])
                ratings.append(parsed[2])
                ts.append(parsed[3])
    return _to_arrays(users, items, ratings, ts)


def _read_csv_ratings(path: Path, report: LoadReport) -> _Arrays:
    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    ts: list[int] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            return _to_arrays(users, items, ratings, ts)
        has_header = bool(header) and header[0].strip().lower() == "userid"
        rows = reader if has_header else _chain_first(header, reader)
        for fields in rows:
            if not fields:
                continue
            report.rows_read += 1
            parsed = _parse_rating(fields, path.name, reader.line_num, report)
            if parsed is not None:
                users.append(parsed[0])
                items.append(parsed[1])
                ratings.append(parsed[2])
                ts.append(parsed[3])
    return _to_arrays(users, items, ratings, ts)


def _chain_first(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


def _movie(
    item_id: str, title: str, genres: list[str], first_seen: dict[int, int], start: int
) -> ItemRecord:
    tags = tuple(g for g in genres if g and g != "(no genres listed)")
    return ItemRecord(
        item_id=str(int(item_id)),
        title=title.strip(),
        ts=first_seen.get(int(item_id), start),
        tags=tags,
    )


def _read_csv_movies(
    path: Path, first_seen: dict[int, int], start: int, report: LoadReport
) -> list[ItemRecord]:
    out: list[ItemRecord] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is not None and header[:1] != ["movieId"]:
            reader_rows: Iterator[list[str]] = _chain_first(header, reader)
        else:
            reader_rows = reader
        for fields in reader_rows:
            if not fields:
                continue
            report.rows_read += 1
            if len(fields) != 3 or not fields[0].strip().isdigit() or not fields[1].strip():
                report.skip(path.name, reader.line_num, f"bad movie row {fields[:3]!r}")
                continue
            out.append(_movie(fields[0], fields[1], fields[2].split("|"), first_seen, start))
    return out


def _read_dat_movies(
    path: Path, first_seen: dict[int, int], start: int, report: LoadReport
) -> list[ItemRecord]:
    out: list[ItemRecord] = []
    with path.open(encoding="latin-1", newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            report.rows_read += 1
            fields = line.split("::")
            if len(fields) != 3 or not fields[0].strip().isdigit() or not fields[1].strip():
                report.skip(path.name, line_no, f"bad movie row {line[:80]!r}")
                continue
            out.append(_movie(fields[0], fields[1], fields[2].split("|"), first_seen, start))
    return out


def _read_100k_genres(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ML100K_GENRES
    names: dict[int, str] = {}
    with path.open(encoding="latin-1") as fh:
        for line in fh:
            name, _, index = line.strip().rpartition("|")
            if name and index.isdigit():
                names[int(index)] = name
    return tuple(names[i] for i in sorted(names)) or ML100K_GENRES


def _read_100k_movies(
    path: Path, genre_path: Path, first_seen: dict[int, int], start: int, report: LoadReport
) -> list[ItemRecord]:
    genres = _read_100k_genres(genre_path)
    out: list[ItemRecord] = []
    with path.open(encoding="latin-1", newline="") as fh:
        for line_no, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            report.rows_read += 1
            fields = line.split("|")
            flags = fields[5:]
            if (
                len(fields) != 5 + len(genres)
                or not fields[0].strip().isdigit()
                or not fields[1].strip()
                or any(f not in ("0", "1") for f in flags)
            ):
                report.skip(path.name, line_no, f"bad movie row {line[:80]!r}")
                continue
            names = [g for g, f in zip(genres, flags, strict=True) if f == "1" and g != "unknown"]
            out.append(_movie(fields[0], fields[1], names, first_seen, start))
    return out
