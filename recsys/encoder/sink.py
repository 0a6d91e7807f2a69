"""The encoder worker's sink and :func:`build`: items topic → pretrained text encoder (cached)
→ item-vectors topic.

Offsets advance only past records whose vectors the broker acknowledged. When a send fails (a
broker outage longer than the producer's delivery timeout), the partitions are sought back to
their last acknowledged offset and encoded again (the vector cache makes that cheap), so no item
is committed without its vector and the worker keeps running.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaTimeoutError
from kafka.structs import TopicPartition

from recsys.app import WorkerApp
from recsys.config import Settings
from recsys.encoder.cache import VectorCache, encode_cached
from recsys.encoder.text import TextEncoder, text_key
from recsys.errors import ConfigError
from recsys.events import ItemRecord, ItemVector, Rejection, item_text, parse_item
from recsys.kafka import (
    DeadLetterWriter,
    Sink,
    close_producer,
    make_producer,
    replace_producer,
)

log = logging.getLogger(__name__)

WORKER = "encoder"


class EncoderSink(Sink):
    """Validates catalogue records, encodes new or changed texts, produces their vectors.

    It holds no catalogue: a text's vector comes from the on-disk :class:`VectorCache` or the
    encoder, so the worker's memory does not grow with the number of items.
    """

    worker = WORKER

    def __init__(
        self,
        encoder: TextEncoder,
        cache: VectorCache | None,
        producer: KafkaProducer,
        vectors_topic: str,
        dlq: DeadLetterWriter,
        ack_timeout_s: float = 60.0,
        parse: Callable[[Any], ItemRecord | Rejection] = parse_item,
        new_producer: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self.encoder = encoder
        self.new_producer = new_producer  # replaces a producer whose flush wedged
        self.cache = cache
        self.producer = producer
        self.topic = vectors_topic
        self.dlq = dlq
        self.ack_timeout_s = ack_timeout_s
        self.parse = parse
        self.consumer: KafkaConsumer | None = None
        self._futures: list[Any] = []
        self._written: dict[TopicPartition, int] = {}
        self._acked: dict[TopicPartition, int] = {}
        self.send_failures = 0

    def write(self, records: Sequence[ConsumerRecord]) -> None:
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            self._acked.setdefault(tp, r.offset)  # nothing of this partition acked yet
            self._written[tp] = r.offset + 1
        items: dict[str, ItemRecord] = {}
        for _, item in self.decode(records, self.parse):
            items[item.item_id] = item  # the newest record of an item in the batch wins
        if not items:
            return
        name = self.encoder.name
        texts = {item.item_id: item_text(item) for item in items.values()}
        keys = {item_id: text_key(name, text) for item_id, text in texts.items()}
        vectors = encode_cached(self.encoder, self.cache, {keys[i]: t for i, t in texts.items()})
        for item_id, key in keys.items():
            message = ItemVector(item_id, name, key, tuple(vectors[key].tolist()))
            self._futures.append(
                self.producer.send(self.topic, key=item_id.encode(), value=message.to_bytes())
            )

    def flush(self) -> Mapping[TopicPartition, int] | None:
        futures, self._futures = self._futures, []
        try:
            self.producer.flush(timeout=self.ack_timeout_s)
            failed = [f.exception for f in futures if not f.succeeded()]
        except Exception as exc:  # a flush that times out: nothing of the batch is known acked
            failed = [exc]
            if isinstance(exc, KafkaTimeoutError) and self.new_producer is not None:
                self.producer = replace_producer(self.producer, self.new_producer, WORKER, self.dlq)
        if not failed:
            self._acked = dict(self._written)
            return dict(self._acked)
        self.send_failures += 1
        log.error("%d item vectors not acknowledged (%s); re-encoding", len(failed), failed[0])
        self._rewind()
        return dict(self._acked)

    def _rewind(self) -> None:
        """Seek every partition back to its last acknowledged offset, to send again."""
        if self.consumer is not None:
            for tp, offset in self._acked.items():
                if tp in self.consumer.assignment():
                    self.consumer.seek(tp, offset)
        self._written = dict(self._acked)

    def on_assign(self, consumer: KafkaConsumer, partitions: list[TopicPartition]) -> None:
        self.consumer = consumer

    def on_revoke(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._acked.pop(tp, None)
            self._written.pop(tp, None)

    def close(self) -> None:
        close_producer(self.producer)
        if self.cache is not None:
            self.cache.close()


def build(settings: Settings) -> WorkerApp:
    """The encoder worker: the configured (or packaged) text model, with its vector cache."""
    enc = settings.encoder
    encoder = TextEncoder(enc.model_path, device=enc.device, batch_size=enc.batch_size)
    if encoder.dim != enc.dim:
        # The learner sizes its item tower from this setting: a mismatch would be silently lost.
        raise ConfigError(
            f"RECSYS_ENCODER__DIM={enc.dim} but the model at {encoder.path} gives {encoder.dim}"
        )
    producer = make_producer(settings.kafka)
    sink = EncoderSink(
        encoder,
        VectorCache(enc.cache_dir, encoder.name, encoder.dim),
        producer,
        settings.topics.item_vectors,
        DeadLetterWriter(producer, settings.topics.dlq, WORKER),
        parse=functools.partial(
            parse_item,
            max_bytes=settings.events.max_bytes,
            max_id_length=settings.events.max_id_length,
            max_title_length=settings.events.max_title_length,
        ),
        new_producer=lambda: make_producer(settings.kafka),
    )
    return WorkerApp(WORKER, enc.group_id, [settings.topics.items], sink)
