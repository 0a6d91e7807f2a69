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

A checkpoint directory may come from anywhere (a copy, a volume, a hand edit), so the manifest is
held to what the directory really contains: it must list exactly the plain files present (an
unlisted or missing file fails), names are bare file names (no path separator, no ``..``), and
neither the directory nor any file in it may be a symbolic link. Loaders open data files only
through :func:`checkpoint_file`, which refuses a name the verified manifest does not list, so a
file the hashes did not cover is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import stat
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
# A data file's name: a bare name (no separator, so it cannot leave the directory), not hidden,
# not absurdly long. ".." is refused on top of this, so no name can walk up either.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Manifest(dict[str, Any]):
    """A manifest as :func:`read_manifest` returns it: the JSON object, plus where it was checked.

    ``verified_dir`` is the (absolute) checkpoint directory whose every file matched the
    manifest's hashes, or None when it was read with ``verify=False``; :func:`checkpoint_file`
    serves files only from a manifest verified for that same directory.
    """

    verified_dir: Path | None = None


def _valid_file_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and _FILE_NAME.match(name) is not None
        and ".." not in name
        and name != MANIFEST
    )


def _short(value: object) -> str:
    # Names come from a file someone else wrote: bound what an error message echoes.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_plain_file(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a regular file (a symlink is not, whatever it
    points to: lstat looks at the link itself)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path.parent}: missing file {path.name}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{path.parent}: {path.name} is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path.parent}: {path.name} is not a plain file")


def _check_plain_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{path}: checkpoint directory is a symbolic link")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: not a directory")


def _read_plain(path: Path) -> bytes:
    _check_plain_file(path)
    # O_NOFOLLOW as well: a file swapped for a link after the lstat above is still refused.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        return f.read()


def sha256_file(path: Path) -> str:
    """The sha256 of regular file ``path``; raises CheckpointError for a symlink or non-file."""
    _check_plain_file(path)
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
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
            if not _valid_file_name(name):  # readers would refuse it
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
        while os.path.lexists(final):  # lexists: a dangling symlink is taken too
            n += 1
            final = root / f"v{step:012d}-{n}"
        os.rename(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(path: str | Path, verify: bool = True) -> Manifest:
    """The manifest of checkpoint ``path``; with ``verify`` every file's sha256 is checked.

    Raises CheckpointError if the directory or a file in it is a symlink or not plain, the
    manifest is missing or unreadable, its format unknown, a listed name is not a bare file name,
    the listed files differ from the files present (one missing, or one present but unlisted),
    or (with ``verify``) a hash differs.
    """
    path = Path(path)
    _check_plain_dir(path)
    try:
        manifest = json.loads(_read_plain(path / MANIFEST))
    except CheckpointError as exc:
        if not os.path.lexists(path / MANIFEST):
            raise CheckpointError(f"{path}: no {MANIFEST} (partial checkpoint)") from None
        raise exc from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable {MANIFEST}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown checkpoint format")
    files, step = manifest.get("files"), manifest.get("step")
    if not isinstance(files, dict) or not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{path}: manifest lacks files or step")
    for name, digest in files.items():
        if not _valid_file_name(name):
            raise CheckpointError(f"{path}: bad file name {_short(name)} in {MANIFEST}")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise CheckpointError(f"{path}: bad sha256 for {name} in {MANIFEST}")
    # The manifest must describe the directory exactly: loaders open fixed names, so a file the
    # manifest leaves out would be read without ever having been hashed.
    try:
        with os.scandir(path) as entries:
            present = {e.name for e in entries} - {MANIFEST}
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot list the checkpoint: {exc}") from None
    unlisted = present - set(files)
    if unlisted:
        raise CheckpointError(f"{path}: files not listed in {MANIFEST}: {_short(sorted(unlisted))}")
    for name in files:  # also refuses symlinks and directories among the listed names
        _check_plain_file(path / name)
    result = Manifest(manifest)
    if verify:
        for name, digest in files.items():
            if sha256_file(path / name) != digest:
                raise CheckpointError(f"{path}: sha256 mismatch for {name}")
        result.verified_dir = Path(os.path.abspath(path))
    return result


def checkpoint_file(path: str | Path, manifest: Mapping[str, Any], name: str) -> Path:
    """The path of data file ``name`` of checkpoint ``path``, for a loader to open.

    ``manifest`` must be what ``read_manifest(path)`` (with ``verify``) returned: the file is
    served only if that manifest lists it, and it is still a plain file. Raises CheckpointError
    otherwise, so a loader can never read a file the hashes did not cover. (Whether an optional
    file was saved: ``name in manifest["files"]``.)
    """
    path = Path(path)
    verified = manifest.verified_dir if isinstance(manifest, Manifest) else None
    if verified is None or verified != Path(os.path.abspath(path)):
        raise CheckpointError(f"{path}: manifest not verified for this checkpoint")
    if name not in manifest["files"]:
        raise CheckpointError(f"{path}: {_short(name)} is not listed in {MANIFEST}")
    _check_plain_file(path / name)
    return path / name


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under ``root``, newest first (by step, then save order).

    Symlinks are left out whatever they point to: a link named like a newer version would
    otherwise shadow (and, when pruning, outrank) the real checkpoints.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and not p.is_symlink() and p.is_dir():
            found.append((int(m.group(1)), int(m.group(2) or 0), p))
    return [p for _, _, p in sorted(found, reverse=True)]


def find_latest(root: str | Path) -> tuple[Path, Manifest] | None:
    """The newest checkpoint that verifies, with its manifest; invalid ones are logged, skipped."""
    for path in list_checkpoints(root):
        try:
            return path, read_manifest(path)
        except CheckpointError as exc:
            log.warning("skipping invalid checkpoint: %s", exc)
    return None


def _created_at(path: Path) -> float:
    try:
        value = read_manifest(path, verify=False).get("created_at")
    except CheckpointError:
        return float("-inf")
    return float(value) if isinstance(value, int | float) else float("-inf")


def prune(root: str | Path, keep: int, protect: str | Path | None = None) -> list[Path]:
    """Keep the newest ``keep`` checkpoints that verify; returns what left ``root``.

    Older checkpoints are deleted. One that does not verify (corrupt, tampered, half-copied by
    hand) does not count towards ``keep``: it is moved to ``root/invalid/`` with a warning, so it
    can be inspected but no longer shadows good versions (a tampered "future" step would
    otherwise stay newest forever and be skipped, with a warning, on every load).

    Never deleted: the newest valid checkpoint, and ``protect`` if it verifies (the one the
    caller just wrote; default: the most recently written, by the manifests' ``created_at``), so
    a writer whose steps restarted below older versions still on disk does not delete its own
    checkpoint. Symlinks are never followed, deleted or counted (see :func:`list_checkpoints`).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    listed = list_checkpoints(root)
    if protect is None:
        protect = max(listed, key=_created_at, default=None)
    spared = Path(os.path.abspath(protect)) if protect is not None else None
    kept = 0
    removed = []
    for path in listed:
        protected = Path(os.path.abspath(path)) == spared
        if kept >= keep and not protected:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            continue
        try:
            read_manifest(path)
        except CheckpointError as exc:
            _set_aside(root, path, exc)
            removed.append(path)
            continue
        if kept < keep:
            kept += 1
    return removed


def _set_aside(root: Path, path: Path, exc: CheckpointError) -> None:
    quarantine = root / INVALID_DIR
    if quarantine.is_symlink():  # moving into it would put the checkpoint wherever it points
        log.warning("deleting invalid checkpoint (%s is a symlink): %s", quarantine, exc)
        shutil.rmtree(path, ignore_errors=True)
        return
    quarantine.mkdir(exist_ok=True)
    target = quarantine / f"{path.name}-{time.time_ns()}"
    log.warning("moving invalid checkpoint to %s: %s", target, exc)
    path.rename(target)
