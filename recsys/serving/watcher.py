"""The model watcher: hot-swaps the newest valid checkpoint in a background thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from recsys import checkpoint as ckpt
from recsys import metrics
from recsys.errors import CheckpointError
from recsys.serving.model import ServingModel

log = logging.getLogger(__name__)

NO_MODEL_VERSION = "cold-start"
"""``model_version`` of slates published before any model version exists."""
WORKER = "publisher"


class ModelWatcher:
    """Watches a checkpoint directory; loads a newer version in the background, swaps atomically.

    ``current`` is one reference, replaced in a single assignment once the new model is fully
    loaded, so a reader sees the old model or the new one, never a half-loaded one, and never
    none after the first load. A checkpoint that fails verification is skipped (and remembered,
    so it is not retried every tick).

    ``sync``, when given, runs at the start of each :meth:`poll` to bring new versions into
    ``root`` (e.g. :meth:`recsys.model_store.ModelStore.sync`); its errors are logged, never
    fatal: the watcher goes on with what ``root`` holds.
    """

    def __init__(
        self,
        root: str | Path,
        loader: Callable[[Path], ServingModel],
        interval_s: float = 1.0,
        sync: Callable[[], object] | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.root = Path(root)
        self.loader = loader
        self.interval_s = interval_s
        self.sync = sync
        self.current: ServingModel | None = None
        self.on_swap: Callable[[ServingModel], None] | None = None
        self._failed: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> bool:
        """Load the newest valid version if it is newer than the current one; True if swapped."""
        if self.sync is not None:
            try:
                self.sync()
            except Exception:
                log.exception("model watcher: syncing model versions failed")
        current = self.current.version if self.current is not None else None
        for path in ckpt.list_checkpoints(self.root):
            if path.name == current:
                return False
            if path.name in self._failed:
                continue
            try:
                model = self.loader(path)
            except CheckpointError as exc:
                log.warning("skipping model version %s: %s", path.name, exc)
                self._failed.add(path.name)
                continue
            self.current = model  # the atomic swap
            metrics.MODEL_SWAPS.inc()
            step = model.manifest.get("step")
            if isinstance(step, int):
                metrics.MODEL_VERSION.labels(worker="publisher").set(step)
            log.info("serving model version %s (%d items)", model.version, len(model.item_ids))
            if self.on_swap is not None:
                self.on_swap(model)
            return True
        return False

    @property
    def alive(self) -> bool:
        """True while the background watcher thread runs (for /healthz)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> ModelWatcher:
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # keep serving the current version whatever a load does
                log.exception("model watcher: unexpected error")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
