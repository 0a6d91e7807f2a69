"""The on-disk cache of item vectors.

:class:`VectorCache` keeps vectors in one SQLite file per text model, keyed by
``sha256(model name, text)``: an unchanged item is never encoded twice, across runs too. Nothing
is held in memory but SQLite's page cache, so a catalogue of any size costs the encoder disk,
not RAM. Keys and vectors reach SQLite as bound parameters; a vector is float32 bytes, so
nothing read back is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors.numpy import load_file as np_load_file

from recsys import metrics

if TYPE_CHECKING:
    from recsys.encoder.text import TextEncoder

log = logging.getLogger(__name__)

# SQLite allows 32,766 bound parameters per statement; a batch lookup stays well below.
_LOOKUP_CHUNK = 900


class VectorCache:
    """Item vectors on disk, keyed by :func:`~recsys.encoder.text.text_key`.

    The file is ``root/<sha256(model name)[:16]>/vectors.sqlite``. A stored vector of the wrong
    width (a file written for another model of the same name) reads as missing, so it is
    encoded again and overwritten. Safetensors shards from the cache's earlier layout are
    imported once and removed.

    >>> import tempfile
    >>> cache = VectorCache(tempfile.mkdtemp(), "model", dim=2)
    >>> cache.put(["k"], np.array([[0.5, 1.0]], dtype=np.float32))
    >>> cache.get("k").tolist(), cache.get("other"), len(cache)
    ([0.5, 1.0], None, 1)
    """

    def __init__(self, root: str | Path, model_name: str, dim: int) -> None:
        self.model_name = model_name
        self.dim = dim
        self.dir = Path(root) / hashlib.sha256(model_name.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "vectors.sqlite"
        # The encoder's loop is one thread; the check would only refuse a close from another.
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash loses no committed put
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS vectors (key TEXT PRIMARY KEY, vector BLOB NOT NULL)"
        )
        self._db.commit()
        self._import_shards()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0])

    def get(self, key: str) -> np.ndarray | None:
        return self.get_many([key]).get(key)

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys`` (absent keys are left out)."""
        found: dict[str, np.ndarray] = {}
        unique = list(dict.fromkeys(keys))
        width = self.dim * 4
        for i in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[i : i + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                f"SELECT key, vector FROM vectors WHERE key IN ({marks})",  # noqa: S608 (only '?'s)
                chunk,
            )
            for key, blob in rows:
                if len(blob) == width:
                    found[key] = np.frombuffer(blob, dtype=np.float32).copy()
        return found

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(keys), self.dim):
            raise ValueError(f"vectors must be {(len(keys), self.dim)}, got {vectors.shape}")
        with self._db:  # one transaction: all of the batch or none
            self._db.executemany(
                "INSERT OR REPLACE INTO vectors (key, vector) VALUES (?, ?)",
                [(k, v.tobytes()) for k, v in zip(keys, vectors, strict=True)],
            )

    def close(self) -> None:
        self._db.close()

    def _import_shards(self) -> None:
        """Move vectors from the earlier layout's ``shard-*.safetensors`` files into SQLite."""
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                arrays = np_load_file(str(shard))
                keys = [str(k) for k in _json_list(arrays["keys"].tobytes())]
                vecs = arrays["vectors"]
                if vecs.ndim == 2 and vecs.shape[1] == self.dim and len(keys) == len(vecs):
                    self.put(keys, vecs)
                else:
                    log.warning("dropping vector cache shard %s with the wrong shape", shard)
            except Exception as exc:  # a corrupt shard is dropped, its texts encoded again
                log.warning("dropping unreadable vector cache shard %s: %s", shard, exc)
            shard.unlink(missing_ok=True)


def encode_cached(
    encoder: TextEncoder, cache: VectorCache | None, texts: Mapping[str, str]
) -> dict[str, np.ndarray]:
    """``{text key: vector}`` for ``texts`` (``{text key: text}``): from the cache where it
    has them, otherwise encoded (each distinct text once, in one call) and cached."""
    found = cache.get_many(list(texts)) if cache is not None else {}
    metrics.ITEM_CACHE_HITS.inc(len(found))
    todo = [k for k in texts if k not in found]
    if todo:
        vectors = encoder.encode([texts[k] for k in todo])
        metrics.ITEMS_ENCODED.inc(len(todo))
        if cache is not None:
            cache.put(todo, vectors)
        found.update(zip(todo, vectors, strict=True))
    return found


def _json_list(data: bytes) -> list[object]:
    value = json.loads(data.decode())
    if not isinstance(value, list):
        raise ValueError("shard keys are not a list")
    return value
