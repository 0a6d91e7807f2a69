"""Kill test of the reward worker: SIGKILL it at random moments while events stream in.

The events topic receives the OBD sample plus synthetic sessions (``--events`` in all), 1%
poison messages (every rejection reason of the event contract, one of them a 10 MB payload)
spread at random positions, then one sentinel event per partition that closes every window.
A replay thread paces them over ``--replay-seconds``. Meanwhile a driver starts
`recsys worker reward` as a subprocess, waits until it has partitions and has restored their
state, lets it run for a random 0.2–3 s and SIGKILLs it, ``--kills`` times; then one last
worker runs until the rewards topic holds every reward of the oracle (the offline join of the
same valid events).

Reported (JSON with ``--json``):

- ``lost``: oracle rewards missing from the topic (must be 0);
- ``wrong``: reward_ids whose first record differs from the oracle's, or that the oracle does
  not have (must be 0);
- ``duplicates_before_dedupe``: records beyond the first per reward_id (re-reads after kills);
  ``conflicting_duplicates``: of those, ones whose content differs from the first (must be 0);
- ``dlq_missing`` / ``dlq_wrong_reason``: poison messages not in the DLQ, or there with another
  reason (must be 0); ``worker_exits``: how each worker process ended (-9: our SIGKILL);
- ``reemitted_per_restart``: records beyond the first per reward_id, per restart after a kill
  (the join's state is durable with each commit, so a restart re-emits at most the batch that
  was in flight: ``max_batch`` events' worth).

    python -m recsys.testing.reward_kill --events 100000 --kills 10 --json reward_kill.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from kafka.structs import TopicPartition

from recsys.broker import EmbeddedBroker
from recsys.config import KafkaSettings, RewardSettings
from recsys.events import RewardRecord
from recsys.kafka import create_topics, make_consumer
from recsys.rewards import offline_join_for
from recsys.testing.streams import (
    kill_test_events,
    poison_messages,
    produce,
    read_topic,
    sentinels,
    with_poison,
)


class RewardReader(threading.Thread):
    """Reads the rewards topic as it fills: first record per reward_id, repeats counted."""

    def __init__(self, kafka: KafkaSettings, topic: str, partitions: int) -> None:
        super().__init__(daemon=True)
        self.consumer = make_consumer(kafka, None)
        self.consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        self.consumer.seek_to_beginning()
        self.first: dict[str, RewardRecord] = {}
        self.records = 0
        self.conflicting = 0
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                for recs in self.consumer.poll(timeout_ms=200, max_records=10_000).values():
                    with self.lock:
                        for r in recs:
                            rec = RewardRecord.from_bytes(r.value)
                            self.records += 1
                            old = self.first.setdefault(rec.reward_id, rec)
                            if old is not rec and old != rec:
                                self.conflicting += 1
        finally:
            self.consumer.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def worker_env(
    bootstrap: str, topics: dict[str, str], partitions: int, group: str
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RECSYS_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "RECSYS_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "RECSYS_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            "RECSYS_KAFKA__MAX_POLL_INTERVAL_MS": "10000",
            "RECSYS_TOPICS__EVENTS": topics["events"],
            "RECSYS_TOPICS__REWARDS": topics["rewards"],
            "RECSYS_TOPICS__DLQ": topics["dlq"],
            "RECSYS_TOPICS__REWARD_STATE": topics.get("reward_state", f"{topics['events']}.state"),
            "RECSYS_TOPICS__PARTITIONS": str(partitions),
            "RECSYS_REWARDS__GROUP_ID": group,
            "RECSYS_METRICS__PORT": "0",
            "RECSYS_LOG_LEVEL": "INFO",
        }
    )
    return env


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "recsys", "worker", "reward"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    finally:
        log.close()


def wait_assigned(proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> bool:
    """Wait until the worker says it has partitions (or died, or timed out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if b"reward worker assigned partitions [" in log_path.read_bytes():
            return True
        time.sleep(0.1)
    return False


def wait_restored(proc: subprocess.Popen[bytes], log_path: Path, timeout_s: float) -> bool:
    """Wait until the worker restored a partition's state (or died, or timed out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if b"resuming at offset" in log_path.read_bytes():
            return True
        time.sleep(0.05)
    return False


def run_kill_test(
    n_events: int = 100_000,
    kills: int = 10,
    *,
    seed: int = 0,
    partitions: int = 6,
    replay_seconds: float = 60.0,
    poison_rate: float = 0.01,
    big_payload: bool = True,
    timeout_s: float = 600.0,
    bootstrap: str | None = None,
    log_dir: Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the whole kill test; returns the report (see the module docstring)."""
    rng = random.Random(seed)
    started = time.monotonic()
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="reward-kill-"))
    log_dir.mkdir(parents=True, exist_ok=True)

    rs = RewardSettings()
    events = kill_test_events(n_events, seed)
    closing = sentinels(events, partitions, rs)
    poison = poison_messages(max(11, round(len(events) * poison_rate)), seed, big=big_payload)
    messages = with_poison(events, poison, seed) + [
        (e.user_id.encode(), e.to_bytes()) for e in closing
    ]
    oracle = offline_join_for(events + closing, rs)
    n_events = len(events) + len(closing)
    say(f"{n_events:,} events, {len(poison):,} poison, {len(oracle):,} oracle rewards")

    broker = None
    if bootstrap is None:
        broker = EmbeddedBroker().start()
        bootstrap = broker.bootstrap
    kafka = KafkaSettings(
        bootstrap_servers=bootstrap,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_interval_ms=10000,
    )
    prefix = f"kill{uuid.uuid4().hex[:8]}"
    topics = {"events": f"{prefix}.events", "rewards": f"{prefix}.rewards", "dlq": f"{prefix}.dlq"}
    procs: list[subprocess.Popen[bytes]] = []
    reader: RewardReader | None = None
    try:
        create_topics(kafka, [topics["events"], topics["rewards"]], partitions)
        create_topics(kafka, [topics["dlq"]], 1)
        env = worker_env(bootstrap, topics, partitions, f"{prefix}.reward")
        reader = RewardReader(kafka, topics["rewards"], partitions)
        reader.start()
        rate = len(messages) / replay_seconds if replay_seconds > 0 else None
        replay = threading.Thread(
            target=produce, args=(kafka, topics["events"], messages, rate), daemon=True
        )
        replay.start()

        done_kills = 0
        deadline = started + timeout_s
        while done_kills < kills and time.monotonic() < deadline:
            log_path = log_dir / f"worker-{len(procs)}.log"
            proc = start_worker(env, log_path)
            procs.append(proc)
            if not wait_assigned(proc, log_path, 60):
                raise RuntimeError(f"worker {len(procs) - 1} never got partitions; see {log_path}")
            # From the end of its state restore, so the kill lands while it processes events.
            wait_restored(proc, log_path, 60)
            time.sleep(rng.uniform(0.2, 3.0))
            if proc.poll() is not None:
                raise RuntimeError(f"worker {len(procs) - 1} stopped by itself; see {log_path}")
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done_kills += 1
            with reader.lock:
                have = len(reader.first)
            elapsed = time.monotonic() - started
            say(f"kill {done_kills}: after {elapsed:.1f}s, {have:,} rewards so far")

        log_path = log_dir / f"worker-{len(procs)}.log"
        final = start_worker(env, log_path)
        procs.append(final)
        replay.join(max(1.0, deadline - time.monotonic()))
        while time.monotonic() < deadline:
            with reader.lock:
                missing = len(oracle.keys() - reader.first.keys())
            if missing == 0:
                break
            if final.poll() is not None:
                raise RuntimeError(f"the last worker stopped by itself; see {log_path}")
            time.sleep(0.5)
        time.sleep(2.0)  # anything still in flight
        final.send_signal(signal.SIGTERM)
        try:
            final.wait(30)
        except subprocess.TimeoutExpired:
            final.kill()
            final.wait()

        reader.stop()
        dlq = read_topic(kafka, topics["dlq"])
        expected = Counter((hashlib.sha256(p.value).hexdigest(), p.reason) for p in poison)
        got: dict[str, set[str]] = {}
        for r in dlq:
            reason = dict(r.headers).get("recsys.reason", b"").decode()
            got.setdefault(hashlib.sha256(r.value).hexdigest(), set()).add(reason)
        dlq_missing = sum(1 for (h, _) in expected if h not in got)
        dlq_wrong = sum(1 for (h, reason) in expected if h in got and got[h] != {reason})

        first = reader.first
        lost = len(oracle.keys() - first.keys())
        wrong = sum(1 for k, v in first.items() if oracle.get(k) != v)
        report = {
            "events": len(events) + len(closing),
            "poison": len(poison),
            "poison_by_reason": dict(sorted(Counter(p.reason for p in poison).items())),
            "oracle_rewards": len(oracle),
            "kills": done_kills,
            "worker_exits": [p.returncode for p in procs],
            "records": reader.records,
            "unique_reward_ids": len(first),
            "lost": lost,
            "wrong": wrong,
            "duplicates_before_dedupe": reader.records - len(first),
            "reemitted_per_restart": round((reader.records - len(first)) / max(1, done_kills), 1),
            "max_batch": rs.max_batch,
            "conflicting_duplicates": reader.conflicting,
            "dlq_records": len(dlq),
            "dlq_missing": dlq_missing,
            "dlq_wrong_reason": dlq_wrong,
            "seconds": round(time.monotonic() - started, 1),
            "logs": str(log_dir),
        }
        return report
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if reader is not None and reader.is_alive():
            reader.stop()
        if broker is not None:
            broker.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="events (OBD + synthetic)")
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs before the last worker")
    ap.add_argument("--replay-seconds", type=float, default=60.0, help="pace of the replay")
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=900.0, help="give up after (s)")
    ap.add_argument("--json", type=Path, help="write the report here too")
    args = ap.parse_args(argv)
    report = run_kill_test(
        args.events,
        args.kills,
        seed=args.seed,
        partitions=args.partitions,
        replay_seconds=args.replay_seconds,
        timeout_s=args.timeout,
    )
    for k, v in report.items():
        print(f"{k:<26} {v}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    ok = (
        report["lost"] == 0
        and report["wrong"] == 0
        and report["conflicting_duplicates"] == 0
        and report["dlq_missing"] == 0
        and report["dlq_wrong_reason"] == 0
        and report["kills"] >= args.kills
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
