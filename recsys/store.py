"""The SQL store: published recommendations, model versions, and the publisher's user state.

SQLAlchemy 2 (Core statements on ORM tables), SQLite by default, PostgreSQL by URL. The schema is
created or upgraded when a :class:`Store` opens: missing tables are created, missing nullable
columns are added, and a database written by a newer recsys is refused. Every value reaches the
database as a bound parameter, so ids with quotes, semicolons or any Unicode are stored verbatim.

Tables
------
``recommendations``   one row per user: the latest slate (items with score, propensity and
                      position as JSON), model version, policy (``model``/``cold_start``),
                      request id, the newest event time it reflects, updated at.
``cold_start``        the slate served to users the publisher has never seen (one row).
``model_versions``    every model version a publisher loaded: checkpoint path, created/loaded
                      at, metrics from the checkpoint manifest.
``user_histories``    the publisher's per-user state, everything that must outlive an eviction
                      from its bounded cache: positive-item entries ``[ts, item_id, event_id,
                      request_id]``, watched item ids (oldest first), the user's rating count
                      and sum, and the events partition the user's events come from (the
                      replica that owns the partition owns the user).
``item_popularity``   positive-feedback counts per item, for cold-start slates.
``publisher_offsets`` per (group, topic, partition) the next offset whose effects are not yet in
                      the store, written in the same transaction as the state it vouches for.
                      It also fences zombies: a batch whose offset for a partition is behind
                      the stored one comes from a replica that lost the partition while it
                      worked, and is refused whole (:class:`~recsys.errors.FencedError`).
``schema_info``       the schema version.

:meth:`Store.save_batch` writes a publisher batch (slates, histories, popularity, cold-start
slate, the offsets it covers) in **one** transaction: after a crash the store holds the whole
batch or none of it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from kafka.partitioner.default import murmur2
from sqlalchemy import event as sa_event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from recsys import metrics
from recsys.errors import FencedError, RecsysError
from recsys.events import Slate, slate_items_from_json, slate_items_to_json

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
COLD_START_KEY = "default"


class StoreError(RecsysError):
    """The store cannot be opened or its schema is newer than this code."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class RecommendationRow(Base):
    __tablename__ = "recommendations"

    user_id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    request_id: Mapped[str] = mapped_column(sa.Text, nullable=False)
    model_version: Mapped[str] = mapped_column(sa.Text, nullable=False)
    policy: Mapped[str] = mapped_column(sa.String(32), nullable=False)
    items: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    published_ms: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    event_ts: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), nullable=False)


class ColdStartRow(Base):
    __tablename__ = "cold_start"

    key: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(sa.Text, nullable=False)
    model_version: Mapped[str] = mapped_column(sa.Text, nullable=False)
    items: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    published_ms: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), nullable=False)


class ModelVersionRow(Base):
    __tablename__ = "model_versions"

    version: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    checkpoint_path: Mapped[str] = mapped_column(sa.Text, nullable=False)
    created_at: Mapped[dt.datetime | None] = mapped_column(
        sa.DateTime(timezone=True), nullable=True
    )
    loaded_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), nullable=False)
    metrics: Mapped[Any] = mapped_column(sa.JSON, nullable=False)


class UserHistoryRow(Base):
    __tablename__ = "user_histories"

    user_id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    entries: Mapped[Any] = mapped_column(sa.JSON, nullable=False)
    updated_at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True), nullable=False)
    # Nullable: added in place to a version-1 store, whose rows have none of them.
    partition: Mapped[int | None] = mapped_column(sa.Integer, nullable=True, index=True)
    watched: Mapped[Any] = mapped_column(sa.JSON, nullable=True)
    rating_n: Mapped[int | None] = mapped_column(sa.BigInteger, nullable=True)
    rating_sum: Mapped[float | None] = mapped_column(sa.Float, nullable=True)


class PublisherOffsetRow(Base):
    __tablename__ = "publisher_offsets"

    group_id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    topic: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    partition: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    next_offset: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)


class ItemPopularityRow(Base):
    __tablename__ = "item_popularity"

    item_id: Mapped[str] = mapped_column(sa.Text, primary_key=True)
    positives: Mapped[int] = mapped_column(sa.BigInteger, nullable=False)


class SchemaInfoRow(Base):
    __tablename__ = "schema_info"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    version: Mapped[int] = mapped_column(sa.Integer, nullable=False)


@dataclass(frozen=True)
class StoredSlate:
    """A slate as the store holds it."""

    slate: Slate
    policy: str
    event_ts: int | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class SlateWrite:
    """One user's slate in a publisher batch."""

    slate: Slate
    policy: str
    event_ts: int | None = None


HistoryEntry = tuple[int, str, str]  # (event ts, item_id, event_id)
StateEntry = tuple[int, str, str, str | None]  # (event ts, item_id, event_id, request_id)


@dataclass(frozen=True)
class UserStateRow:
    """What the store keeps of one publisher user (all of it survives a cache eviction)."""

    user_id: str
    partition: int | None
    entries: tuple[StateEntry, ...]  # positive feedback, event-time order
    watched: tuple[str, ...]  # item ids given any feedback, oldest first
    rating_n: int = 0
    rating_sum: float = 0.0


def partition_for(user_id: str, partitions: int) -> int:
    """The events partition of ``user_id`` under kafka-python's default partitioner (murmur2 of
    the UTF-8 key, as the Java client): where a keyed producer sends the user's events.

    Only for rows written before the store recorded each user's source partition; a producer
    with another partitioner (librdkafka's default is CRC32) is why new rows keep the partition
    the events actually came from.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions!r}")
    return (murmur2(user_id.encode()) & 0x7FFFFFFF) % partitions


_LOCK_RETRIES = 5
_IN_CHUNK = 500  # ids per IN (...) list: well under SQLite's and PostgreSQL's parameter limits


class Store:
    """Repository over the SQL store; opening it creates or upgrades the schema.

    Parameters
    ----------
    url:
        SQLAlchemy URL: ``sqlite:///path.db`` (default file) or ``postgresql+psycopg://...``.
    echo:
        Log every SQL statement (debugging).
    """

    def __init__(self, url: str, *, echo: bool = False) -> None:
        if not isinstance(url, str) or not url.startswith(("sqlite", "postgresql")):
            raise StoreError(f"url must be a sqlite:// or postgresql:// URL, got {url!r}")
        self.url = url
        parsed = sa.make_url(url)
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"echo": echo, "future": True}
        if self.dialect == "sqlite":
            db = parsed.database
            if db and db != ":memory:" and not db.startswith("file:"):
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
        try:
            self.engine = sa.create_engine(url, **kwargs)
        except Exception as exc:  # bad driver, malformed URL
            raise StoreError(f"cannot open store {parsed!r}: {exc}") from exc
        if self.dialect == "sqlite":
            sa_event.listen(self.engine, "connect", _sqlite_pragmas)
        self._upgrade_schema()

    # --- schema -----------------------------------------------------------------------------

    def _upgrade_schema(self) -> None:
        try:
            with self.engine.begin() as conn:
                Base.metadata.create_all(conn)  # missing tables only
                self._add_missing_columns(conn)
                row = conn.execute(sa.select(SchemaInfoRow.version).where(SchemaInfoRow.id == 1))
                found = row.scalar_one_or_none()
                if found is None:
                    conn.execute(sa.insert(SchemaInfoRow).values(id=1, version=SCHEMA_VERSION))
                elif found > SCHEMA_VERSION:
                    raise StoreError(
                        f"store schema version {found} is newer than this recsys "
                        f"({SCHEMA_VERSION}); upgrade recsys"
                    )
                elif found < SCHEMA_VERSION:
                    conn.execute(
                        sa.update(SchemaInfoRow)
                        .where(SchemaInfoRow.id == 1)
                        .values(version=SCHEMA_VERSION)
                    )
        except StoreError:
            raise
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot prepare the store schema: {exc}") from exc

    @staticmethod
    def _add_missing_columns(conn: sa.Connection) -> None:
        """Additive upgrades: a nullable column the models have and the table lacks is added."""
        inspector = sa.inspect(conn)
        preparer = conn.dialect.identifier_preparer
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for col in table.columns:
                if col.name in have:
                    continue
                if not col.nullable:
                    raise StoreError(
                        f"table {table.name} lacks non-nullable column {col.name}; "
                        "it cannot be added in place"
                    )
                ddl = (
                    f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN "
                    f"{preparer.format_column(col)} {col.type.compile(conn.dialect)}"
                )
                log.info("store upgrade: %s", ddl)
                conn.execute(sa.text(ddl))

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(SchemaInfoRow.version)).scalar_one())

    # --- writes -----------------------------------------------------------------------------

    def _insert(self, table: type[Base]) -> Any:
        mod = postgresql if self.dialect == "postgresql" else sqlite
        return mod.insert(table.__table__)

    def _upsert(
        self, conn: sa.Connection, table: type[Base], rows: list[dict[str, Any]], key: str
    ) -> None:
        if not rows:
            return
        stmt = self._insert(table)
        update = {c: stmt.excluded[c] for c in rows[0] if c != key}
        conn.execute(stmt.on_conflict_do_update(index_elements=[key], set_=update), rows)

    def save_batch(
        self,
        slates: Sequence[SlateWrite],
        *,
        histories: Mapping[str, Sequence[HistoryEntry]] | None = None,
        states: Sequence[UserStateRow] = (),
        popularity: Mapping[str, int] | None = None,
        cold_start: Slate | None = None,
        offsets: Mapping[tuple[str, str, int], int] | None = None,
    ) -> None:
        """Upsert a publisher batch in one transaction (all of it or, after a crash, none).

        Rows are written in key order, so replicas writing overlapping rows (popularity, the
        cold-start slate, users handed over) lock them in one order; a transaction that still
        fails on a lock (a deadlock, SQLite's busy database) is rolled back whole and retried.

        ``states`` replace whole user rows; ``histories`` (entries only) is the version-1 form.
        ``offsets``: ``{(group, topic, partition): next offset}`` the batch's state covers.
        """
        now = _now()
        rec_rows = [
            {
                "user_id": w.slate.user_id,
                "request_id": w.slate.request_id,
                "model_version": w.slate.model_version,
                "policy": w.policy,
                "items": slate_items_to_json(w.slate.items),
                "published_ms": w.slate.ts,
                "event_ts": w.event_ts,
                "updated_at": now,
            }
            for w in sorted(slates, key=lambda w: w.slate.user_id)
        ]
        hist_rows = [
            {"user_id": u, "entries": [list(e) for e in entries], "updated_at": now}
            for u, entries in sorted((histories or {}).items())
        ]
        state_rows = [
            {
                "user_id": st.user_id,
                "entries": [list(e) for e in st.entries],
                "updated_at": now,
                "partition": st.partition,
                "watched": list(st.watched),
                "rating_n": st.rating_n,
                "rating_sum": st.rating_sum,
            }
            for st in sorted(states, key=lambda st: st.user_id)
        ]
        for attempt in range(_LOCK_RETRIES):
            try:
                self._write_batch(rec_rows, hist_rows, state_rows, popularity, cold_start, offsets)
                return
            except sa.exc.OperationalError as exc:
                if attempt == _LOCK_RETRIES - 1:
                    raise
                log.warning("store batch rolled back (%s); retrying", type(exc.orig).__name__)
                time.sleep(0.05 * 2**attempt)

    def _write_batch(
        self,
        rec_rows: list[dict[str, Any]],
        hist_rows: list[dict[str, Any]],
        state_rows: list[dict[str, Any]],
        popularity: Mapping[str, int] | None,
        cold_start: Slate | None,
        offsets: Mapping[tuple[str, str, int], int] | None,
    ) -> None:
        now = _now()
        with self.engine.begin() as conn:
            if offsets:
                self._fence(conn, offsets)
            self._upsert(conn, RecommendationRow, rec_rows, "user_id")
            self._upsert(conn, UserHistoryRow, hist_rows, "user_id")
            self._upsert(conn, UserHistoryRow, state_rows, "user_id")
            if offsets:
                stmt = self._insert(PublisherOffsetRow)
                rows = [
                    {"group_id": g, "topic": t, "partition": p, "next_offset": int(o)}
                    for (g, t, p), o in sorted(offsets.items())
                ]
                if rows:
                    conn.execute(
                        stmt.on_conflict_do_update(
                            index_elements=["group_id", "topic", "partition"],
                            set_={"next_offset": stmt.excluded.next_offset},
                        ),
                        rows,
                    )
            if popularity:
                stmt = self._insert(ItemPopularityRow)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["item_id"],
                    set_={"positives": ItemPopularityRow.positives + stmt.excluded.positives},
                )
                conn.execute(
                    stmt,
                    [{"item_id": i, "positives": int(n)} for i, n in sorted(popularity.items())],
                )
            if cold_start is not None:
                self._upsert(
                    conn,
                    ColdStartRow,
                    [
                        {
                            "key": COLD_START_KEY,
                            "request_id": cold_start.request_id,
                            "model_version": cold_start.model_version,
                            "items": slate_items_to_json(cold_start.items),
                            "published_ms": cold_start.ts,
                            "updated_at": now,
                        }
                    ],
                    "key",
                )

    def _fence(self, conn: sa.Connection, offsets: Mapping[tuple[str, str, int], int]) -> None:
        """Refuse the batch if any partition's stored offset is ahead of the batch's.

        Offsets only move forward for the replica that owns a partition (it resumes from the
        stored offset), so a stored offset ahead of ours means another replica took the
        partition over and stored newer state: ours is stale and must not overwrite it. The
        rows are locked (PostgreSQL; SQLite has one writer) until the transaction ends, so a
        new owner cannot store in between the check and our write.
        """
        o = PublisherOffsetRow
        keys = sorted(offsets)
        stmt = (
            sa.select(o.group_id, o.topic, o.partition, o.next_offset)
            .where(sa.tuple_(o.group_id, o.topic, o.partition).in_(keys))
            .order_by(o.group_id, o.topic, o.partition)
        )
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update()
        behind = [
            (t, p, stored, offsets[(g, t, p)])
            for g, t, p, stored in conn.execute(stmt)
            if stored > offsets[(g, t, p)]
        ]
        if behind:
            metrics.STORE_FENCED_BATCHES.inc()
            t, p, stored, ours = behind[0]
            raise FencedError(
                f"store holds {t}[{p}] up to offset {stored}, this batch only to {ours}: "
                f"another replica owns the partition now ({len(behind)} partitions behind)"
            )

    def record_model_version(
        self,
        version: str,
        checkpoint_path: str,
        *,
        created_at: dt.datetime | None = None,
        metrics: Mapping[str, Any] | None = None,
    ) -> None:
        """Remember a loaded model version (idempotent: loading it again updates loaded_at)."""
        row = {
            "version": version,
            "checkpoint_path": checkpoint_path,
            "created_at": created_at,
            "loaded_at": _now(),
            "metrics": dict(metrics or {}),
        }
        with self.engine.begin() as conn:
            self._upsert(conn, ModelVersionRow, [row], "version")

    # --- reads ------------------------------------------------------------------------------

    def get_recommendation(self, user_id: str) -> StoredSlate | None:
        """The stored slate of ``user_id``, or None when the store has none."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(RecommendationRow).where(RecommendationRow.user_id == user_id)
                )
                .mappings()
                .one_or_none()
            )
        if row is None:
            return None
        slate = Slate(
            row["request_id"],
            row["user_id"],
            row["model_version"],
            int(row["published_ms"]),
            slate_items_from_json(row["items"]),
        )
        return StoredSlate(slate, row["policy"], row["event_ts"], row["updated_at"])

    def get_cold_start(self) -> StoredSlate | None:
        """The slate for users the publisher has never seen."""
        with self.engine.connect() as conn:
            row = (
                conn.execute(sa.select(ColdStartRow).where(ColdStartRow.key == COLD_START_KEY))
                .mappings()
                .one_or_none()
            )
        if row is None:
            return None
        slate = Slate(
            row["request_id"],
            "",
            row["model_version"],
            int(row["published_ms"]),
            slate_items_from_json(row["items"]),
        )
        return StoredSlate(slate, "cold_start", None, row["updated_at"])

    def all_recommendations(self) -> dict[str, StoredSlate]:
        """Every stored slate by user (tests, tools; not for the hot path)."""
        out = {}
        with self.engine.connect() as conn:
            for row in conn.execute(sa.select(RecommendationRow)).mappings():
                slate = Slate(
                    row["request_id"],
                    row["user_id"],
                    row["model_version"],
                    int(row["published_ms"]),
                    slate_items_from_json(row["items"]),
                )
                out[row["user_id"]] = StoredSlate(
                    slate, row["policy"], row["event_ts"], row["updated_at"]
                )
        return out

    def known_users(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(RecommendationRow.user_id)).scalars())

    def load_histories(self) -> Iterable[tuple[str, list[HistoryEntry]]]:
        with self.engine.connect() as conn:
            for user_id, entries in conn.execute(
                sa.select(UserHistoryRow.user_id, UserHistoryRow.entries)
            ):
                yield user_id, [(int(e[0]), str(e[1]), str(e[2])) for e in entries or []]

    def load_user_states(self, user_ids: Iterable[str]) -> dict[str, UserStateRow]:
        """The stored state of each of ``user_ids`` that has a row (one query per 500 ids)."""
        ids = list(dict.fromkeys(user_ids))
        out: dict[str, UserStateRow] = {}
        cols = (
            UserHistoryRow.user_id,
            UserHistoryRow.partition,
            UserHistoryRow.entries,
            UserHistoryRow.watched,
            UserHistoryRow.rating_n,
            UserHistoryRow.rating_sum,
        )
        with self.engine.connect() as conn:
            for start in range(0, len(ids), _IN_CHUNK):
                chunk = ids[start : start + _IN_CHUNK]
                for row in conn.execute(sa.select(*cols).where(UserHistoryRow.user_id.in_(chunk))):
                    user_id, partition, entries, watched, rating_n, rating_sum = row
                    parsed = tuple(
                        (int(e[0]), str(e[1]), str(e[2]), None if len(e) < 4 else e[3])
                        for e in entries
                    )
                    # A version-1 row has no watched list: its positives were all it knew.
                    seen = watched if watched is not None else [e[1] for e in parsed]
                    out[user_id] = UserStateRow(
                        user_id,
                        partition,
                        parsed,
                        tuple(str(i) for i in seen),
                        int(rating_n or 0),
                        float(rating_sum or 0.0),
                    )
        return out

    def owned_users(
        self,
        partition: int,
        *,
        after: str = "",
        limit: int = 1000,
        stale_for: str | None = None,
    ) -> list[str]:
        """Users of one events partition, by user id after ``after`` (keyset paging, so a
        refresh of millions of users holds one page at a time); with ``stale_for``, only those
        whose stored slate is missing or of another model version."""
        stmt = sa.select(UserHistoryRow.user_id).where(
            UserHistoryRow.partition == partition, UserHistoryRow.user_id > after
        )
        if stale_for is not None:
            rec = RecommendationRow
            stmt = stmt.outerjoin(rec, rec.user_id == UserHistoryRow.user_id).where(
                sa.or_(rec.model_version.is_(None), rec.model_version != stale_for)
            )
        stmt = stmt.order_by(UserHistoryRow.user_id).limit(limit)
        with self.engine.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def fill_partitions(self, partitions: int) -> int:
        """Give every user row without a partition (a version-1 store) the one kafka-python's
        default partitioner picks for its key, and a row to every user that has a stored slate
        but no state row; returns how many rows changed."""
        changed = 0
        with self.engine.begin() as conn:
            missing = conn.execute(
                sa.select(RecommendationRow.user_id).where(
                    ~sa.exists().where(UserHistoryRow.user_id == RecommendationRow.user_id)
                )
            ).scalars()
            now = _now()
            rows = [{"user_id": u, "entries": [], "updated_at": now} for u in missing]
            if rows:  # replicas starting together may race here: the first insert wins
                conn.execute(self._insert(UserHistoryRow).on_conflict_do_nothing(), rows)
            todo = list(
                conn.execute(
                    sa.select(UserHistoryRow.user_id).where(UserHistoryRow.partition.is_(None))
                ).scalars()
            )
            for user_id in todo:
                conn.execute(
                    sa.update(UserHistoryRow)
                    .where(UserHistoryRow.user_id == user_id)
                    .values(partition=partition_for(user_id, partitions))
                )
            changed = len(todo)
        return changed

    def publisher_offsets(self, group: str) -> dict[tuple[str, int], int]:
        """Per (topic, partition), the next offset whose effects the store does not hold yet."""
        stmt = sa.select(
            PublisherOffsetRow.topic, PublisherOffsetRow.partition, PublisherOffsetRow.next_offset
        ).where(PublisherOffsetRow.group_id == group)
        with self.engine.connect() as conn:
            return {(t, int(p)): int(o) for t, p, o in conn.execute(stmt)}

    def load_popularity(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ItemPopularityRow.item_id, ItemPopularityRow.positives))
            return {i: int(n) for i, n in rows}

    def model_versions(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ModelVersionRow).order_by(ModelVersionRow.loaded_at))
            return [dict(r) for r in rows.mappings()]

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL: readers (e.g. `recsys recommend`) never block the publisher's batch transaction, and a
    # committed transaction survives a SIGKILL of the writer.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
