"""Encoder memory: Python allocations while the encoder sink sees N, then 2N distinct items.

The sink keeps no catalogue (vectors live in the SQLite :class:`VectorCache`), so its memory
should not grow with the items it has seen. The reference, measured in the same run on the
same items, is an :class:`ItemCatalog` holding them (what the sink held before). Allocations are
``tracemalloc``'s (numpy included; SQLite's own page cache, a fixed 2 MiB by default, is not
traced). ``ratio`` = the sink's growth from N to 2N items over the catalogue's.

    python benchmarks/encoder_memory.py [--items 20000] [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from kafka.consumer.fetcher import ConsumerRecord

from recsys.encoder.cache import VectorCache
from recsys.encoder.catalog import ItemCatalog
from recsys.encoder.sink import EncoderSink
from recsys.encoder.text import TextEncoder
from recsys.events import ItemRecord
from recsys.kafka import DeadLetterWriter

BATCH = 500


class _NullProducer:
    def send(self, *_: Any, **__: Any) -> None:
        return None


def _record(i: int) -> ConsumerRecord:
    value = json.dumps({"item_id": f"item-{i}", "title": f"item {i} title", "ts": 1}).encode()
    return ConsumerRecord("items", 0, -1, i, 0, 0, None, value, [], None, -1, -1, -1)


def _records(first: int, n: int) -> list[ConsumerRecord]:
    return [_record(i) for i in range(first, first + n)]


def _traced_mib() -> float:
    gc.collect()
    return tracemalloc.get_traced_memory()[0] / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20_000, help="N (the run sees 2N items)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    encoder = TextEncoder(device="cpu", batch_size=256)
    tmp = Path(tempfile.mkdtemp(prefix="encoder-memory-"))
    cache = VectorCache(tmp / "cache", encoder.name, encoder.dim)
    producer: Any = _NullProducer()  # nothing is sent: only the sink's own memory is measured
    sink = EncoderSink(encoder, cache, producer, "v", DeadLetterWriter(producer, "dlq", "encoder"))
    catalog = ItemCatalog(encoder, cache_dir=tmp / "cache")  # the same cache: no re-encoding

    tracemalloc.start()
    sink_mib, catalog_mib = [], []
    for half in range(2):
        for first in range(half * args.items, (half + 1) * args.items, BATCH):
            batch = _records(first, BATCH)
            sink.write(batch)
            sink._futures.clear()  # the null producer returns no futures to await
        sink_mib.append(_traced_mib())
    catalog_base = _traced_mib()
    for half in range(2):
        for first in range(half * args.items, (half + 1) * args.items, BATCH):
            catalog.upsert(
                ItemRecord(f"item-{i}", f"item {i} title", 1) for i in range(first, first + BATCH)
            )
        catalog_mib.append(_traced_mib() - catalog_base)
    tracemalloc.stop()

    sink_growth = sink_mib[1] - sink_mib[0]
    catalog_growth = catalog_mib[1] - catalog_mib[0]
    result = {
        "items": 2 * args.items,
        "sink_mib_after_n": round(sink_mib[0], 3),
        "sink_mib_after_2n": round(sink_mib[1], 3),
        "catalog_mib_after_n": round(catalog_mib[0], 3),
        "catalog_mib_after_2n": round(catalog_mib[1], 3),
        "sink_bytes_per_item": round(sink_growth * 2**20 / args.items, 1),
        "catalog_bytes_per_item": round(catalog_growth * 2**20 / args.items, 1),
        "ratio": round(sink_growth / catalog_growth, 4) if catalog_growth > 0 else None,
    }
    print(f"{'':26}{'after N':>12}{'after 2N':>12}{'bytes/item':>12}")
    print(
        f"{'encoder sink':26}{sink_mib[0]:>10.2f}Mi{sink_mib[1]:>10.2f}Mi"
        f"{result['sink_bytes_per_item']:>12}"
    )
    print(
        f"{'ItemCatalog (reference)':26}{catalog_mib[0]:>10.2f}Mi{catalog_mib[1]:>10.2f}Mi"
        f"{result['catalog_bytes_per_item']:>12}"
    )
    print(f"ratio (sink growth / catalogue growth, N to 2N = {args.items:,}): {result['ratio']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
