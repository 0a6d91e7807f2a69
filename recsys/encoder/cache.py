"""The on-disk cache of item vectors.

:class:`VectorCache` keeps vectors on disk as safetensors shards, keyed by
``sha256(model name, text)``: an unchanged item is never encoded twice, across runs too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

log = logging.getLogger(__name__)


class VectorCache:
    """Item vectors on disk, keyed by :func:`text_key`; safetensors shards, never pickle.

    Each :meth:`put` writes one new shard atomically (temp file, fsync, rename) under
    ``root/<sha256(model name)[:16]>/``; all shards are read at construction.
    """

    def __init__(self, root: str | Path, model_name: str, dim: int) -> None:
        self.model_name = model_name
        self.dim = dim
        self.dir = Path(root) / hashlib.sha256(model_name.encode()).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        self._vectors: dict[str, np.ndarray] = {}
        for shard in sorted(self.dir.glob("shard-*.safetensors")):
            try:
                arrays = np_load_file(str(shard))
                keys = json.loads(arrays["keys"].tobytes().decode())
                vecs = arrays["vectors"]
            except Exception as exc:  # a corrupt shard is skipped, its texts re-encoded
                log.warning("skipping unreadable vector cache shard %s: %s", shard, exc)
                continue
            if vecs.ndim != 2 or vecs.shape[1] != dim or len(keys) != len(vecs):
                log.warning("skipping vector cache shard %s with wrong shape", shard)
                continue
            for k, v in zip(keys, vecs, strict=True):
                self._vectors[k] = v

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, key: str) -> np.ndarray | None:
        return self._vectors.get(key)

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        blob = np.frombuffer(json.dumps(list(keys)).encode(), dtype=np.uint8)
        name = f"shard-{len(list(self.dir.glob('shard-*.safetensors'))):06d}-{uuid.uuid4().hex[:8]}"
        tmp = self.dir / f".{name}.tmp"
        np_save_file(
            {"vectors": vectors, "keys": blob.copy()},
            str(tmp),
            metadata={"model": self.model_name},
        )
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{name}.safetensors")
        for k, v in zip(keys, vectors, strict=True):
            self._vectors[k] = v
