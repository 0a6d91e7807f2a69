"""Atomic, verifiable checkpoint directories.

A checkpoint is a directory ``<root>/v<step:012d>`` (``-<n>`` appended if that step was saved
before) holding data files and ``manifest.json``::

    {"format": 1, "step": ..., "offsets": {...}, "config": {...}, "created_at": ...,
     "files": {"model.safetensors": "<sha256>", ...}, "extra": {...}}

It is written into ``<root>/.tmp-...``, every file and the directory fsynced, then renamed into
place and the root fsynced, so a reader sees either the whole checkpoint or none of it. A reader
checks every file's sha256 against the manifest; a partial, corrupt or tampered checkpoint
raises :class:`~recsys.errors.CheckpointError` and :func:`find_latest` skips it. Tensors are
safetensors and metadata JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from recsys.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_NAME = re.compile(r"^v(\d{12})(?:-(\d+))?$")
# Where :func:`prune` moves checkpoints that fail verification (its name never matches _NAME).
INVALID_DIR = "invalid"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    root: str | Path,
    step: int,
    writers: Mapping[str, Callable[[Path], None]],
    manifest: Mapping[str, Any],
) -> Path:
    """Write a checkpoint atomically and return its final path.

    ``writers`` maps a file name to a function writing that file at the given path; ``manifest``
    holds the metadata (``offsets``, ``config``, ``extra``...); ``format``, ``step``,
    ``created_at`` and ``files`` (sha256 per file) are added here.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a writer that died mid-checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-v{step:012d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        hashes = {}
        for name, write in writers.items():
            if name == MANIFEST or "/" in name or name.startswith("."):
                raise ValueError(f"bad checkpoint file name {name!r}")
            write(tmp / name)
            _fsync_path(tmp / name)
            hashes[name] = sha256_file(tmp / name)
        body = dict(manifest)
        body.update(format=FORMAT_VERSION, step=int(step), created_at=time.time(), files=hashes)
        with open(tmp / MANIFEST, "w") as f:
            json.dump(body, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        _fsync_path(tmp)
        final = root / f"v{step:012d}"
        n = 0
        while final.exists():
            n += 1
            final = root / f"v{step:012d}-{n}"
        os.rename(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of checkpoint ``path``; with ``verify`` every file's sha256 is checked.

    Raises CheckpointError if the manifest is missing or unreadable, its format unknown, a file
    missing, or a hash differs.
    """
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (partial checkpoint)") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        raise CheckpointError(f"{path}: manifest lacks files or step")
    if verify:
        for name, digest in files.items():
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{path}: missing file {name}")
            if sha256_file(f) != digest:
                raise CheckpointError(f"{path}: sha256 mismatch for {name}")
    return manifest


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, newest first (by step, then save order)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return [p for _, _, p in sorted(found, reverse=True)]


def find_latest(root: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies, with its manifest; invalid ones are logged, skipped."""
    for path in list_checkpoints(root):
        try:
            return path, read_manifest(path)
        except CheckpointError as exc:
            log.warning("skipping invalid checkpoint: %s", exc)
    return None


def prune(root: str | Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` checkpoints that verify; returns what left ``root``.

    Older checkpoints are deleted. One that does not verify (corrupt, tampered, half-copied by
    hand) does not count towards ``keep``: it is moved to ``root/invalid/`` with a warning, so it
    can be inspected but no longer shadows good versions (a tampered "future" step would
    otherwise stay newest forever and be skipped, with a warning, on every load).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    kept = 0
    removed = []
    for path in list_checkpoints(root):
        if kept == keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        try:
            read_manifest(path)
        except CheckpointError as exc:
            quarantine = root / INVALID_DIR
            quarantine.mkdir(exist_ok=True)
            target = quarantine / f"{path.name}-{time.time_ns()}"
            log.warning("moving invalid checkpoint to %s: %s", target, exc)
            path.rename(target)
            removed.append(path)
            continue
        kept += 1
    return removed
