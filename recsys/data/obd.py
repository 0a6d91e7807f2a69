"""The Open Bandit Dataset (ZOZOTOWN) CSV layout as events and as arrays for off-policy evaluation.

A campaign folder (e.g. ``open_bandit_dataset/random/all``) holds ``<campaign>.csv`` with one
row per (impression, slot): an unnamed row index, ``timestamp``, ``item_id``, ``position``
(1-based in the files), ``click``, ``propensity_score``, hashed ``user_feature_*`` columns and
``user-item_affinity_<item>`` columns; ``item_context.csv`` holds the item features.

Each row becomes one ``impression`` event (position 0-based, as the event contract says) and,
when ``click == 1``, a ``click`` event with the same ``request_id``. OBD does not publish user
ids: the ``user_id`` here is a hash of the row's user-feature columns, so rows that share all
user features share a "user". It is a cohort key, not a person; say so in anything built on it.
OBD gives no separate click time either, so a click carries its impression's timestamp.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from recsys.data.load_report import LoadReport
from recsys.errors import DataError
from recsys.events import Event, ItemRecord

logger = logging.getLogger(__name__)

_REQUIRED = ("timestamp", "item_id", "position", "click", "propensity_score")
_ITEM_CONTEXT = "item_context.csv"


@dataclass(frozen=True)
class OBDLog:
    """Logged bandit feedback, one entry per row, in the file's (time) order.

    Arrays follow obp's naming: ``action`` (n,), ``position`` (n,) 0-based, ``reward`` (n,),
    ``pscore`` (n,), ``context`` (n, d) = one-hot user features then user-item affinities,
    ``action_context`` (n_actions, d_a) = numeric item features then one-hot categorical ones.
    """

    path: Path
    behavior_policy: str | None
    row_index: np.ndarray  # int64 (n,), the file's own row index
    ts_ms: np.ndarray  # int64 (n,)
    action: np.ndarray  # int64 (n,)
    position: np.ndarray  # int64 (n,)
    reward: np.ndarray  # float64 (n,)
    pscore: np.ndarray  # float64 (n,)
    context: np.ndarray  # float64 (n, d)
    action_context: np.ndarray  # float64 (n_actions, d_a)
    user_ids: tuple[str, ...]
    report: LoadReport

    @property
    def n_rounds(self) -> int:
        return len(self.action)

    @property
    def n_actions(self) -> int:
        return int(self.action_context.shape[0])

    @property
    def len_list(self) -> int:
        return int(self.position.max()) + 1 if len(self.position) else 0

    def request_id(self, i: int) -> str:
        return f"obd:{int(self.row_index[i])}:{int(self.ts_ms[i])}"

    def events(self) -> Iterator[Event]:
        """An impression per row, then its click when there was one (same request_id)."""
        model_version = f"obd-{self.behavior_policy}" if self.behavior_policy else None
        for i in range(self.n_rounds):
            row = int(self.row_index[i])
            ts = int(self.ts_ms[i])
            request_id = f"obd:{row}:{ts}"
            item_id = str(int(self.action[i]))
            yield Event(
                event_id=f"obd:{row}:impression",
                type="impression",
                user_id=self.user_ids[i],
                item_id=item_id,
                ts=ts,
                request_id=request_id,
                position=int(self.position[i]),
                propensity=float(self.pscore[i]),
                model_version=model_version,
            )
            if self.reward[i] > 0:
                yield Event(
                    event_id=f"obd:{row}:click",
                    type="click",
                    user_id=self.user_ids[i],
                    item_id=item_id,
                    ts=ts,
                    request_id=request_id,
                    position=int(self.position[i]),
                    model_version=model_version,
                )


def obd_items(log: OBDLog) -> list[ItemRecord]:
    """Catalogue records for the log's items.

    OBD publishes no titles or descriptions, only hashed categorical features, so the title
    is a neutral name and the raw features go into ``attributes``; an encoder sees no real text.
    """
    raw = _read_item_rows(log.path / _ITEM_CONTEXT)
    start = int(log.ts_ms.min()) if log.n_rounds else 0
    first_seen: dict[int, int] = {}
    for a, t in zip(log.action[::-1].tolist(), log.ts_ms[::-1].tolist(), strict=True):
        first_seen[a] = t
    out = []
    for item in range(log.n_actions):
        attrs = raw.get(item, {})
        out.append(
            ItemRecord(
                item_id=str(item),
                title=f"ZOZOTOWN item {item}",
                ts=first_seen.get(item, start),
                attributes=attrs,
            )
        )
    return out


def _read_item_rows(path: Path) -> dict[int, dict[str, str]]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        return {
            int(r["item_id"]): {k: v for k, v in r.items() if k.startswith("item_feature_")}
            for r in reader
        }


def _find_log(folder: Path) -> Path:
    named = folder / f"{folder.name}.csv"
    if named.is_file():
        return named
    candidates = sorted(p for p in folder.glob("*.csv") if p.name != _ITEM_CONTEXT)
    if len(candidates) != 1:
        raise DataError(
            f"expected {named.name} or exactly one log CSV besides {_ITEM_CONTEXT} in {folder}, "
            f"found {[p.name for p in candidates]}"
        )
    return candidates[0]


def _user_id(features: list[str]) -> str:
    digest = hashlib.blake2b("\x1f".join(features).encode(), digest_size=8).hexdigest()
    return f"obd-u:{digest}"


def _parse_ts_ms(text: str) -> int:
    # "2019-11-24 00:00:34.762830+00:00"; fromisoformat keeps the offset, so this is UTC-correct.
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def _one_hot(columns: list[list[str]]) -> np.ndarray:
    """One-hot encode categorical columns (categories sorted, so the encoding is stable)."""
    blocks = []
    for col in columns:
        cats = sorted(set(col))
        index = {c: j for j, c in enumerate(cats)}
        block = np.zeros((len(col), len(cats)))
        block[np.arange(len(col)), [index[v] for v in col]] = 1.0
        blocks.append(block)
    return np.hstack(blocks) if blocks else np.zeros((0, 0))


def load_obd(path: str | Path) -> OBDLog:
    """Load one OBD campaign folder; malformed rows are skipped and listed in ``report``."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"OBD path {folder} is not a directory")
    log_path = _find_log(folder)
    report = LoadReport()
    with log_path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{log_path} is empty")
        col = {name: j for j, name in enumerate(header)}
        missing = [c for c in _REQUIRED if c not in col]
        if missing:
            raise DataError(f"{log_path} lacks columns {missing}")
        user_cols = sorted((c for c in header if c.startswith("user_feature_")), key=_suffix)
        aff_cols = sorted((c for c in header if c.startswith("user-item_affinity_")), key=_suffix)
        rows: list[tuple[int, int, int, int, float, float]] = []
        users: list[list[str]] = []
        affinity: list[list[float]] = []
        for fields in reader:
            if not fields:
                continue
            report.rows_read += 1
            line = reader.line_num
            if len(fields) != len(header):
                report.skip(
                    log_path.name, line, f"expected {len(header)} fields, got {len(fields)}"
                )
                continue
            try:
                index = int(fields[0]) if header[0] == "" else report.rows_read - 1
                ts = _parse_ts_ms(fields[col["timestamp"]])
                item = int(fields[col["item_id"]])
                position = int(fields[col["position"]])
                click = float(fields[col["click"]])
                pscore = float(fields[col["propensity_score"]])
                aff = [float(fields[col[c]]) for c in aff_cols]
            except ValueError as exc:
                report.skip(log_path.name, line, f"bad value: {exc}")
                continue
            if not (0.0 < pscore <= 1.0) or click not in (0.0, 1.0) or item < 0 or position < 1:
                report.skip(
                    log_path.name,
                    line,
                    f"out of range: item={item} position={position} click={click} "
                    f"propensity_score={pscore}",
                )
                continue
            if not all(math.isfinite(a) for a in aff):
                report.skip(log_path.name, line, "non-finite affinity")
                continue
            rows.append((index, ts, item, position - 1, click, pscore))
            users.append([fields[col[c]] for c in user_cols])
            affinity.append(aff)

    action_context = _load_item_context(folder / _ITEM_CONTEXT)
    n_actions = max(
        action_context.shape[0], max((r[2] for r in rows), default=-1) + 1, len(aff_cols)
    )
    if action_context.shape[0] < n_actions:
        logger.warning("item_context has %d items, log uses %d", len(action_context), n_actions)
        pad = np.zeros((n_actions - action_context.shape[0], action_context.shape[1]))
        action_context = np.vstack([action_context, pad])
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    user_block = _one_hot([list(c) for c in zip(*users, strict=True)]) if users else None
    aff_block = np.asarray(affinity, dtype=np.float64).reshape(len(rows), len(aff_cols))
    context = aff_block if user_block is None else np.hstack([user_block, aff_block])
    policy = folder.parent.name if folder.parent.name in ("random", "bts") else None
    logger.info(
        "loaded %s: %d rows, %d clicks, %d skipped",
        log_path,
        len(rows),
        int(arr[:, 4].sum()),
        len(report.skipped),
    )
    return OBDLog(
        path=folder,
        behavior_policy=policy,
        row_index=arr[:, 0].astype(np.int64),
        ts_ms=arr[:, 1].astype(np.int64),
        action=arr[:, 2].astype(np.int64),
        position=arr[:, 3].astype(np.int64),
        reward=arr[:, 4].copy(),
        pscore=arr[:, 5].copy(),
        context=context,
        action_context=action_context,
        user_ids=tuple(_user_id(u) for u in users),
        report=report,
    )


def _suffix(name: str) -> int:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _load_item_context(path: Path) -> np.ndarray:
    """Item features: numeric columns as they are, the rest one-hot; rows ordered by item_id."""
    if not path.is_file():
        logger.warning("%s not found: no item features", path)
        return np.zeros((0, 0))
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = [r for r in reader if r]
    item_col = header.index("item_id")
    feature_cols = [j for j, name in enumerate(header) if name.startswith("item_feature_")]
    rows.sort(key=lambda r: int(r[item_col]))
    numeric, categorical = [], []
    for j in feature_cols:
        values = [r[j] for r in rows]
        try:
            numeric.append([float(v) for v in values])
        except ValueError:
            categorical.append(values)
    blocks = []
    if numeric:
        blocks.append(np.asarray(numeric, dtype=np.float64).T)
    if categorical:
        blocks.append(_one_hot(categorical))
    return np.hstack(blocks) if blocks else np.zeros((len(rows), 0))
