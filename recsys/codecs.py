"""Start-up check that kafka-python can decode every compression codec a topic may carry.

Kafka compresses whole record batches, and the codec is chosen by whoever produced them, not by
the consumer: an app producing events with lz4 makes every recsys consumer of that topic need
the lz4 library. kafka-python only finds out when it fetches such a batch, and then raises
``UnsupportedCodecError`` from deep inside ``poll()``, crashing the worker mid-stream. The codec
libraries are dependencies of recsys; :func:`check_codecs` turns a broken install (a package
missing from an image, a wheel that failed to build) into a clear error at start-up instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kafka import codec

from recsys.errors import ConfigError

# codec name (as kafka-python's ``compression_type`` spells it) -> (is it usable?, what provides
# it). The probes are kafka-python's own, so this says exactly what its decoder will find.
_CODECS: dict[str, tuple[Callable[[], bool], str]] = {
    "gzip": (codec.has_gzip, "Python's gzip module"),
    "snappy": (codec.has_snappy, "the python-snappy package"),
    "lz4": (codec.has_lz4, "the lz4 package"),
    "zstd": (codec.has_zstd, "the zstandard package"),
}

#: Every codec a Kafka producer may use; "none" needs no library.
ALL_CODECS: tuple[str, ...] = ("none", *_CODECS)


def check_codecs(codecs: Iterable[str] = ALL_CODECS) -> None:
    """Raise ConfigError naming each codec in ``codecs`` kafka-python cannot use, and its package.

    The default checks them all, which is what a consumer needs: it cannot know which codec the
    producers of its topics chose. Unknown codec names are an error too.
    """
    missing = []
    for name in codecs:
        if name == "none":
            continue
        if name not in _CODECS:
            raise ConfigError(
                f"unknown Kafka compression codec {name!r}; known: {', '.join(ALL_CODECS)}"
            )
        available, package = _CODECS[name]
        if not available():
            missing.append(f"{name} (needs {package})")
    if missing:
        raise ConfigError(
            "kafka-python cannot decode Kafka batches compressed with: "
            + ", ".join(missing)
            + "; pip install the package(s) named, or reinstall recsys with its dependencies"
        )
