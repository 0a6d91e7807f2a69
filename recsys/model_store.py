"""The model store: checkpoints from the learner to S3-compatible object storage and back.

Without a store URL (``RECSYS_MODEL_STORE__URL`` empty) nothing here is used: the learner's
checkpoint directory *is* the publisher's watch directory (one shared ReadWriteMany volume).
With ``s3://bucket/prefix`` the learner uploads each checkpoint it writes
(:meth:`ModelStore.publish`) and the publisher downloads the newest one into its local watch
directory (:meth:`ModelStore.sync`), which :class:`~recsys.serving.watcher.ModelWatcher` watches
as before.

A version is the checkpoint directory's files under ``<prefix>/<version name>/``. Uploads put the
data files first and ``manifest.json`` last, and only a version whose manifest exists is listed,
so a reader never takes a half-uploaded version. Prune deletes a version's manifest before its
data files for the same reason. A downloaded version lands in a temporary directory, is verified
with :func:`~recsys.checkpoint.read_manifest` (every file's sha256), and only then is renamed
into place: a tampered or truncated object is never served, and a version that fails is
remembered and not downloaded again.

Credentials come from boto3's standard chain (``AWS_*`` environment variables, a web identity
token from IRSA, an instance profile): never from recsys settings, and never logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from recsys import checkpoint as ckpt
from recsys import metrics
from recsys.config import ModelStoreSettings, Settings
from recsys.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef

log = logging.getLogger(__name__)

# The largest manifest.json sync accepts (a real one is a few KiB; this bounds a hostile one).
MAX_MANIFEST_BYTES = 1 << 20
# Local directories sync downloads into; never a version name, and not the ".tmp-" prefix the
# learner's write_checkpoint clears, should both ever share a directory.
_PARTIAL = ".sync-"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigError("RECSYS_MODEL_STORE__URL: must be s3://bucket[/prefix]")
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ConfigError(
            "RECSYS_MODEL_STORE__URL: only s3://bucket[/prefix] (credentials come from the "
            "AWS environment, never the URL)"
        )
    return parts.netloc, parts.path.strip("/")


class ModelStore:
    """Model versions in an S3 bucket under a prefix.

    ``keep`` (the learner's ``keep_checkpoints``) bounds the versions kept remotely after each
    :meth:`publish` and locally after each :meth:`sync`; None keeps everything.
    """

    def __init__(self, client: S3Client, bucket: str, prefix: str, keep: int | None = None):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.keep = keep
        self._failed: set[str] = set()  # versions that failed verification: not fetched again

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        """The store ``settings.model_store`` names; ConfigError if its URL is empty."""
        s = settings.model_store
        if not s.url:
            raise ConfigError("RECSYS_MODEL_STORE__URL is empty: no model store to use")
        bucket, prefix = parse_url(s.url)
        return cls(make_client(s), bucket, prefix, keep=settings.learner.keep_checkpoints)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, version: str, name: str = "") -> str:
        return "/".join(p for p in (self.prefix, version, name) if p)

    # -- listing ---------------------------------------------------------------------------

    def _objects(self) -> dict[str, set[str]]:
        """Version name -> file names present under it (only names shaped like versions)."""
        base = f"{self.prefix}/" if self.prefix else ""
        found: dict[str, set[str]] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
            for obj in page.get("Contents", []):
                version, _, name = obj["Key"][len(base) :].partition("/")
                if ckpt._NAME.match(version) and name and "/" not in name:
                    found.setdefault(version, set()).add(name)
        return found

    def versions(self) -> list[str]:
        """Complete versions (their manifest uploaded), newest first (by step, then save order)."""
        return _newest_first(v for v, names in self._objects().items() if ckpt.MANIFEST in names)

    # -- writer side (the learner) ---------------------------------------------------------

    def publish(self, version_dir: str | Path) -> str:
        """Upload checkpoint ``version_dir`` (verified first); returns the remote version name.

        Data files go first, ``manifest.json`` last. A name already taken remotely (a learner
        that lost its local directory writes the same step again) gets a ``-<n>`` suffix, as
        :func:`~recsys.checkpoint.write_checkpoint` does locally, so a published version is
        never overwritten in place. Then the remote versions are pruned to ``keep`` (the one
        just published is spared, as :func:`~recsys.checkpoint.prune` spares it locally).
        """
        with _measured("publish"):
            return self._publish(Path(version_dir))

    def _publish(self, path: Path) -> str:
        manifest = ckpt.read_manifest(path)
        taken = self._objects()
        name = _free_name(path.name, taken)
        for file_name in sorted(manifest["files"]):
            source = ckpt.checkpoint_file(path, manifest, file_name)
            self.client.upload_file(str(source), self.bucket, self._key(name, file_name))
        self.client.upload_file(
            str(path / ckpt.MANIFEST), self.bucket, self._key(name, ckpt.MANIFEST)
        )
        log.info("model version %s published to %s", name, self.url)
        if self.keep is not None:
            self.prune(self.keep, protect=name)
        return name

    def prune(self, keep: int, protect: str | None = None) -> list[str]:
        """Keep the newest ``keep`` complete versions (and ``protect``); returns those deleted.

        Older complete versions lose their manifest first (so no reader lists them any more),
        then their data files. Incomplete versions older than the newest complete one are left
        by an upload that died and are deleted too; a newer incomplete one may be an upload in
        progress and is left alone.
        """
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        objects = self._objects()
        complete = _newest_first(v for v, names in objects.items() if ckpt.MANIFEST in names)
        doomed = [v for v in complete[keep:] if v != protect]
        if complete:
            newest = _sort_key(complete[0])
            doomed += [
                v
                for v, names in objects.items()
                if ckpt.MANIFEST not in names and _sort_key(v) < newest
            ]
        for version in doomed:
            names = objects[version]
            if ckpt.MANIFEST in names:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(version, ckpt.MANIFEST))
            rest: list[ObjectIdentifierTypeDef] = [
                {"Key": self._key(version, n)} for n in sorted(names - {ckpt.MANIFEST})
            ]
            for i in range(0, len(rest), 1000):  # DeleteObjects takes at most 1000 keys
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": rest[i : i + 1000], "Quiet": True}
                )
        if doomed:
            log.info("pruned %d model versions from %s", len(doomed), self.url)
        return doomed

    # -- reader side (the publisher) -------------------------------------------------------

    def sync(self, local_root: str | Path) -> list[Path]:
        """Download the newest verified version not yet under ``local_root``; returns new paths.

        Remote versions are taken newest first; one already present locally ends the search
        (nothing newer is missing). A version that fails verification is set aside (logged,
        remembered, never renamed into ``local_root``) and the next older one is tried. Errors
        talking to the store propagate: the caller (the watcher) logs them and serves on.
        After a download, ``local_root`` is pruned to ``keep`` versions.
        """
        with _measured("sync"):
            return self._sync(Path(local_root))

    def _sync(self, root: Path) -> list[Path]:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_PARTIAL}*"):  # left by a sync that died mid-download
            shutil.rmtree(stale, ignore_errors=True)
        local = {p.name for p in ckpt.list_checkpoints(root)}
        added: list[Path] = []
        for version in self.versions():
            if version in local:
                break
            if version in self._failed:
                continue
            try:
                added.append(self._download(version, root))
            except CheckpointError as exc:
                log.warning("model store: not using version %s: %s", version, exc)
                self._failed.add(version)
                continue
            break
        if added and self.keep is not None:
            ckpt.prune(root, self.keep, protect=added[-1])
        return added

    def _download(self, version: str, root: Path) -> Path:
        tmp = root / f"{_PARTIAL}{version}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            body = self._get(self._key(version, ckpt.MANIFEST), MAX_MANIFEST_BYTES)
            manifest = _parse_manifest(version, body)
            for name in sorted(manifest["files"]):
                self.client.download_file(self.bucket, self._key(version, name), str(tmp / name))
                _fsync(tmp / name)
            _write_synced(tmp / ckpt.MANIFEST, body)
            _fsync(tmp)
            ckpt.read_manifest(tmp)  # every sha256 checked before the version is visible
            final = root / version
            os.rename(tmp, final)
            _fsync(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("model version %s synced from %s", version, self.url)
        return final

    def _get(self, key: str, limit: int) -> bytes:
        response = self.client.get_object(Bucket=self.bucket, Key=key)
        stream = response["Body"]
        try:
            data = stream.read(limit + 1)
        finally:
            stream.close()
        if len(data) > limit:
            raise CheckpointError(f"{key}: larger than {limit} bytes")
        return data


@contextlib.contextmanager
def _measured(op: str) -> Iterator[None]:
    """Count, time and timestamp one store call (``recsys_model_store_*{op}``)."""
    start = time.monotonic()
    try:
        yield
    except BaseException:
        metrics.MODEL_STORE_OPERATIONS.labels(op=op, result="error").inc()
        raise
    finally:
        metrics.MODEL_STORE_SECONDS.labels(op=op).observe(time.monotonic() - start)
    metrics.MODEL_STORE_OPERATIONS.labels(op=op, result="ok").inc()
    metrics.MODEL_STORE_LAST_SUCCESS.labels(op=op).set_to_current_time()


def make_client(settings: ModelStoreSettings) -> S3Client:
    """A boto3 S3 client for ``settings`` (credentials from the standard AWS chain)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(
            "RECSYS_MODEL_STORE__URL is set but boto3 is not installed: pip install 'recsys[s3]'"
        ) from None
    config = Config(
        connect_timeout=5,
        read_timeout=60,
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": settings.addressing_style},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.endpoint_url or None,
        region_name=settings.region or None,
        config=config,
    )


def _sort_key(version: str) -> tuple[int, int]:
    m = ckpt._NAME.match(version)
    if m is None:
        raise ValueError(f"not a version name: {version!r}")
    return int(m.group(1)), int(m.group(2) or 0)


def _newest_first(versions: Any) -> list[str]:
    return sorted(versions, key=_sort_key, reverse=True)


def _free_name(name: str, taken: dict[str, set[str]]) -> str:
    step, n = _sort_key(name)
    candidate = name
    while candidate in taken:
        n += 1
        candidate = f"v{step:012d}-{n}"
    return candidate


def _parse_manifest(version: str, body: bytes) -> dict[str, Any]:
    """The manifest's JSON, with file names safe to download under (read_manifest re-checks
    everything once the files are local)."""
    try:
        manifest = json.loads(body)
    except ValueError as exc:
        raise CheckpointError(f"{version}: unreadable {ckpt.MANIFEST}: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"{version}: {ckpt.MANIFEST} lists no files")
    for name in files:
        if not ckpt._valid_file_name(name):
            raise CheckpointError(f"{version}: bad file name {ckpt._short(name)}")
    return manifest


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
