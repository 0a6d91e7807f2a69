"""The item catalogue: item ids to dense indices, with each item's frozen text vector.

:class:`ItemCatalog` maps item ids to dense indices ``0..I-1`` (growing as items arrive) and
holds each item's text vector; an id never seen in the catalogue gets an index with a zero
text vector (id-only) and is counted in ``recsys_items_unknown_total``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from recsys import metrics
from recsys.encoder.cache import VectorCache, encode_cached
from recsys.encoder.text import TextEncoder, text_key
from recsys.errors import ConfigError
from recsys.events import ItemRecord, item_text

log = logging.getLogger(__name__)


class ItemCatalog:
    """Item ids <-> dense indices, with each item's frozen text vector.

    Parameters
    ----------
    encoder:
        Encodes new or changed texts; ``None`` makes an id-only catalogue (all-zero vectors) of
        width ``dim``.
    cache_dir:
        Where the :class:`VectorCache` lives; ``None`` keeps no disk cache.
    dim:
        Text-vector width when there is no encoder (default 384).
    """

    def __init__(
        self,
        encoder: TextEncoder | None = None,
        cache_dir: str | Path | None = None,
        dim: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.dim = encoder.dim if encoder is not None else (dim or 384)
        self.cache: VectorCache | None = None
        if encoder is not None and cache_dir is not None:
            self.cache = VectorCache(cache_dir, encoder.name, self.dim)
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        self._keys: list[str | None] = []  # text key per index; None = id-only so far
        self._vectors = np.zeros((64, self.dim), dtype=np.float32)
        self.version = 0  # bumped whenever an index is added or a vector changes

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.index

    @property
    def vectors(self) -> np.ndarray:
        """Text vectors ``[I, D]`` (a view; zero rows for id-only items)."""
        return self._vectors[: len(self.ids)]

    def has_text(self, index: int) -> bool:
        return self._keys[index] is not None

    def _new_index(self, item_id: str) -> int:
        i = len(self.ids)
        if i == self._vectors.shape[0]:
            grown = np.zeros((2 * i, self.dim), dtype=np.float32)
            grown[:i] = self._vectors
            self._vectors = grown
        self.ids.append(item_id)
        self.index[item_id] = i
        self._keys.append(None)
        self.version += 1
        return i

    def index_of(self, item_id: str) -> int:
        """Dense index of ``item_id``; an unknown id gets a new id-only index and is counted."""
        i = self.index.get(item_id)
        if i is None:
            metrics.ITEMS_UNKNOWN.inc()
            i = self._new_index(item_id)
        return i

    def upsert(self, items: Iterable[ItemRecord]) -> list[int]:
        """Add or update catalogue records; encodes only texts not seen before. Returns indices."""
        return self.upsert_texts([(it.item_id, item_text(it)) for it in items])

    def upsert_texts(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Like :meth:`upsert` from ``(item_id, text)`` pairs (the text from ``item_text``)."""
        if self.encoder is None:
            raise ConfigError("this catalogue has no text encoder; use index_of for id-only items")
        name = self.encoder.name
        indices: list[int] = []
        changed: dict[str, tuple[str, list[int]]] = {}  # key -> (text, indices waiting for it)
        for item_id, text in pairs:
            i = self.index.get(item_id)
            if i is None:
                i = self._new_index(item_id)
            indices.append(i)
            key = text_key(name, text)
            if self._keys[i] != key:  # an unchanged text needs nothing
                changed.setdefault(key, (text, []))[1].append(i)
        if changed:
            vectors = encode_cached(
                self.encoder, self.cache, {k: t for k, (t, _) in changed.items()}
            )
            for key, (_, waiting) in changed.items():
                for i in waiting:
                    self._set(i, key, vectors[key])
        return indices

    def put_vectors(
        self, item_ids: Sequence[str], vectors: np.ndarray, keys: Sequence[str] | None = None
    ) -> list[int]:
        """Set vectors encoded elsewhere (e.g. by the encoder worker) -> their indices.

        ``vectors [n, D]``; ``keys`` are their :func:`text_key` values when known (else a hash of
        the vector), so an unchanged vector does not bump :attr:`version`.
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(item_ids), self.dim):
            raise ValueError(f"vectors must be [{len(item_ids)}, {self.dim}], got {vectors.shape}")
        out = []
        for n, item_id in enumerate(item_ids):
            i = self.index.get(item_id)
            if i is None:
                i = self._new_index(item_id)
            key = keys[n] if keys is not None else hashlib.sha256(vectors[n].tobytes()).hexdigest()
            if self._keys[i] != key:
                self._set(i, key, vectors[n])
            out.append(i)
        return out

    def _set(self, i: int, key: str, vec: np.ndarray) -> None:
        self._vectors[i] = vec
        self._keys[i] = key
        self.version += 1

    def text_vectors(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.from_numpy(self.vectors.copy()).to(device)

    # --- persistence (safetensors + JSON, for checkpoints) -----------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, object]]:
        return (
            {"vectors": np.ascontiguousarray(self.vectors)},
            {"ids": self.ids, "keys": self._keys, "dim": self.dim},
        )

    def load_state(self, arrays: dict[str, np.ndarray], meta: dict[str, object]) -> None:
        ids = list(meta["ids"])  # type: ignore[call-overload]
        keys = list(meta["keys"])  # type: ignore[call-overload]
        vecs = arrays["vectors"]
        if len(ids) != len(keys) or vecs.shape != (len(ids), self.dim):
            raise ValueError("catalogue state does not match its ids or dimension")
        self.ids = [str(x) for x in ids]
        self.index = {x: i for i, x in enumerate(self.ids)}
        if len(self.index) != len(self.ids):
            raise ValueError("catalogue state has duplicate item ids")
        self._keys = keys
        self._vectors = np.zeros((max(64, len(ids)), self.dim), dtype=np.float32)
        self._vectors[: len(ids)] = vecs
        self.version += 1
