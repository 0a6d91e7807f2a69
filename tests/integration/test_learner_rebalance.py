"""A rebalance in the middle of training never rewinds the learner.

The learner worker (built by ``recsys.learner.sink.build``, in-process on the real broker) has
consumed and checkpointed part of the rewards topic when a second member joins its group and
then leaves; every seek it makes is at or after the offsets of its newest checkpoint, and no
reward is read twice.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
from kafka.structs import TopicPartition

from recsys import checkpoint as ckpt
from recsys.app import make_loop
from recsys.config import load_settings
from recsys.events import RewardRecord
from recsys.kafka import create_topics, make_consumer, make_producer, offsets_from_json
from recsys.learner.sink import LearnerSink, build

pytestmark = pytest.mark.slow

T0 = 1_700_000_000_000
N_REWARDS = 20_000


def _checkpointed(root: str) -> dict[TopicPartition, int]:
    found = ckpt.find_latest(root)
    return {} if found is None else offsets_from_json(found[1]["offsets"])


def test_rebalance_never_seeks_before_the_last_checkpoint(kafka_settings, topic_prefix, tmp_path):
    rewards_topic, vectors_topic = f"{topic_prefix}.rewards", f"{topic_prefix}.vectors"
    group = f"{topic_prefix}.learner"
    create_topics(kafka_settings, [rewards_topic, vectors_topic], 4)
    settings = load_settings(
        kafka=kafka_settings.model_dump(),
        topics={
            "rewards": rewards_topic,
            "item_vectors": vectors_topic,
            "dlq": f"{topic_prefix}.dlq",
        },
        encoder={"dim": 8},
        learner={
            "checkpoint_dir": str(tmp_path / "ckpt"),
            "checkpoint_every_s": 0.2,
            "group_id": group,
            "device": "cpu",
            "dim": 8,
            "max_history": 8,
            "batch_size": 512,
            "replay_ratio": 0.5,
        },
    )
    rng = random.Random(0)
    producer = make_producer(kafka_settings)
    for k in range(N_REWARDS):
        user = f"u{rng.randrange(500)}"
        r = RewardRecord(
            f"r{k}",
            user,
            f"m{rng.randrange(50)}",
            float(rng.random() < 0.2),
            T0 + k,
            "joined",
            0.1,
            0,
            "v0",
            f"q{k}",
        )
        producer.send(rewards_topic, key=user.encode(), value=r.to_bytes())
    producer.flush()
    producer.close()

    app = build(settings)
    sink = app.sink
    assert isinstance(sink, LearnerSink)
    loop = make_loop(settings, app)
    seeks: list[tuple[TopicPartition, int, int]] = []  # (partition, offset, checkpointed then)
    real_seek = loop.consumer.seek

    def recording_seek(tp: TopicPartition, offset: int) -> None:
        seeks.append((tp, offset, _checkpointed(settings.learner.checkpoint_dir).get(tp, 0)))
        real_seek(tp, offset)

    loop.consumer.seek = recording_seek  # type: ignore[method-assign]
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while sum(_checkpointed(settings.learner.checkpoint_dir).values()) < N_REWARDS // 3:
            assert thread.is_alive()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A second member joins (taking rewards partitions away) and leaves (giving them back).
        # Cooperative-sticky takes two rounds, and the broker holds each join ~3 s for more
        # members: 8-11 s on an idle machine, past 15 s with the whole suite beside it.
        other = make_consumer(kafka_settings, group, rewards_topic)
        t_end = time.monotonic() + 60
        while not other.assignment() and time.monotonic() < t_end:
            other.poll(timeout_ms=200)
        took = len(other.assignment())
        other.close(autocommit=False)
        while sum(v for tp, v in sink.consumed.items() if tp.topic == rewards_topic) < N_REWARDS:
            assert thread.is_alive()
            assert time.monotonic() < deadline + 120
            time.sleep(0.2)
    finally:
        loop.stop()
        thread.join(60)
        sink.close()
    assert took > 0, "the second member never got a partition: no rebalance happened"
    rebalance_seeks = [(tp, off, ck) for tp, off, ck in seeks if ck > 0]
    print(f"second member took {took} partitions; learner seeks after it: {rebalance_seeks}")
    assert rebalance_seeks, "the learner got its partitions back without seeking"
    assert all(off >= ck for _, off, ck in seeks), seeks
    assert sink.online.duplicates == 0  # nothing was read twice
