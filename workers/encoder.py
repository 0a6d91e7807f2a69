"""Encoder worker: items topic → pretrained text encoder (cached) → item-vectors topic."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.structs import TopicPartition

from recsys import metrics
from recsys.config import Settings
from recsys.encoder.catalog import ItemCatalog
from recsys.encoder.text import TextEncoder, text_key
from recsys.errors import ConfigError
from recsys.events import ItemRecord, ItemVector, Rejection, item_text, parse_item
from recsys.kafka import DeadLetterWriter, make_producer
from workers.common import run_consumer

log = logging.getLogger(__name__)


class EncoderSink:
    """Validates catalogue records, encodes new or changed texts, produces their vectors."""

    def __init__(
        self,
        catalog: ItemCatalog,
        producer: KafkaProducer,
        vectors_topic: str,
        dlq: DeadLetterWriter,
    ) -> None:
        if catalog.encoder is None:
            raise ValueError("catalog must have a text encoder")
        self.catalog = catalog
        self.producer = producer
        self.topic = vectors_topic
        self.dlq = dlq

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        items: dict[str, ItemRecord] = {}
        for record in records:
            parsed = parse_item(record.value)
            if isinstance(parsed, Rejection):
                metrics.EVENTS_REJECTED.labels(reason=parsed.reason.value).inc()
                self.dlq.send(record, parsed.reason.value, parsed.detail)
                continue
            items[parsed.item_id] = parsed  # the newest record of an item in the batch wins
        if not items:
            return
        indices = self.catalog.upsert(items.values())
        name = self.catalog.encoder.name  # type: ignore[union-attr]
        vectors = self.catalog.vectors
        for item, i in zip(items.values(), indices, strict=True):
            message = ItemVector(
                item.item_id, name, text_key(name, item_text(item)), tuple(vectors[i].tolist())
            )
            self.producer.send(self.topic, key=item.item_id.encode(), value=message.to_bytes())

    def flush(self) -> Mapping[TopicPartition, int] | None:
        self.producer.flush()
        return None


def run(settings: Settings) -> int:
    enc = settings.encoder
    encoder = TextEncoder(enc.model_path, device=enc.device, batch_size=enc.batch_size)
    if encoder.dim != enc.dim:
        # The learner sizes its item tower from this setting: a mismatch would be silently lost.
        raise ConfigError(
            f"RECSYS_ENCODER__DIM={enc.dim} but the model at {encoder.path} gives {encoder.dim}"
        )
    catalog = ItemCatalog(encoder, cache_dir=enc.cache_dir)
    producer = make_producer(settings.kafka)
    sink = EncoderSink(
        catalog,
        producer,
        settings.topics.item_vectors,
        DeadLetterWriter(producer, settings.topics.dlq),
    )
    try:
        return run_consumer(settings, "encoder", enc.group_id, [settings.topics.items], sink)
    finally:
        producer.close()
