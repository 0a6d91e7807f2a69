"""Every Prometheus metric recsys exports, defined once.

Labels are bounded: topic, partition, reason, type, worker, signal, loss, cache. Never a user
or item id.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# --- ingestion -------------------------------------------------------------------------------
EVENTS_CONSUMED = Counter(
    "recsys_events_consumed_total", "Messages consumed from Kafka", ["worker", "topic"]
)
EVENTS_REJECTED = Counter(
    "recsys_events_rejected_total",
    "Records rejected (validation or decoding), by reason and worker",
    ["reason", "worker"],
)
EVENTS_DLQ = Counter(
    "recsys_events_dlq_total", "Messages written to the dead-letter topic", ["reason"]
)
EVENTS_DUPLICATE = Counter(
    "recsys_events_duplicate_total", "Events dropped as duplicates of an event_id already seen"
)
CONSUMER_LAG = Gauge(
    "recsys_consumer_lag",
    "Messages behind the log end, per partition",
    ["worker", "topic", "partition"],
)
CONSUMER_COMMITTED_LAG = Gauge(
    "recsys_consumer_committed_lag",
    "High watermark minus the committed offset: what a restart would re-read",
    ["worker", "topic", "partition"],
)
BATCH_SECONDS = Histogram(
    "recsys_batch_seconds",
    "Time to process one polled batch, sink flush and commit included",
    ["worker"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
PRODUCERS_REPLACED = Counter(
    "recsys_producers_replaced_total",
    "Producers replaced after a flush that did not finish in time (a wedged client)",
    ["worker"],
)
PAUSED_PARTITIONS = Gauge(
    "recsys_paused_partitions", "Partitions paused for back-pressure", ["worker"]
)
REPLAY_EVENTS_SENT = Counter(
    "recsys_replay_events_sent_total", "Events produced by `recsys replay`", ["dataset"]
)

# --- rewards ---------------------------------------------------------------------------------
REWARDS_EMITTED = Counter(
    "recsys_rewards_emitted_total", "Reward records produced, by kind", ["kind"]
)
# Rewards can be negative (skips, centred ratings) and a Counter only goes up: the positive and
# negative parts are counted apart; mean reward = (positive - negative) / emitted.
REWARD_POSITIVE = Counter(
    "recsys_reward_positive_sum_total", "Sum of emitted positive reward values, by kind", ["kind"]
)
REWARD_NEGATIVE = Counter(
    "recsys_reward_negative_sum_total",
    "Sum of the magnitudes of emitted negative reward values, by kind",
    ["kind"],
)
FEEDBACK_LATE = Counter(
    "recsys_feedback_late_total", "Feedback later than the attribution window plus lateness"
)
IMPRESSIONS_LATE = Counter(
    "recsys_impressions_late_total",
    "Impressions arriving after everything remembered of them (e.g. a re-send): no outcome",
)
OPEN_WINDOWS = Gauge("recsys_open_windows", "Impressions waiting for feedback in the window")
DEDUPE_ENTRIES = Gauge("recsys_dedupe_entries", "event_ids remembered for deduplication")
FEEDBACK_EVENTS = Counter(
    "recsys_feedback_events_total",
    "Feedback events seen by the reward worker, by event type",
    ["type"],
)

# --- learner ---------------------------------------------------------------------------------
REPLAY_BUFFER_SIZE = Gauge("recsys_replay_buffer_size", "Samples held in the replay buffer")
REPLAY_BUFFER_CAPACITY = Gauge("recsys_replay_buffer_capacity", "Capacity of the replay buffer")
LEARNER_STEPS = Counter("recsys_learner_steps_total", "Gradient steps taken")
LEARNER_SAMPLES = Counter("recsys_learner_samples_total", "Samples used in gradient steps")
LEARNER_LOSS = Gauge("recsys_learner_loss", "Latest loss value, by term", ["loss"])
LEARNER_SKIPPED_STEPS = Counter(
    "recsys_learner_skipped_steps_total", "Steps skipped because the loss was not finite"
)
LEARNER_REFIT_SECONDS = Histogram(
    "recsys_learner_reward_refit_seconds",
    "Time of one exact refit of the reward head over the replay buffer",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)
CHECKPOINTS_WRITTEN = Counter("recsys_checkpoints_written_total", "Checkpoints written")
CHECKPOINT_TIMESTAMP = Gauge(
    "recsys_checkpoint_timestamp_seconds", "Unix time of the newest checkpoint written"
)
MODEL_VERSION = Gauge("recsys_model_version", "Model version (checkpoint step) in use", ["worker"])
MODEL_STORE_OPERATIONS = Counter(
    "recsys_model_store_operations_total",
    "Model store calls (publish: learner upload, sync: download of a new version), by result",
    ["op", "result"],
)
MODEL_STORE_SECONDS = Histogram(
    "recsys_model_store_seconds",
    "Duration of one model store call",
    ["op"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
MODEL_STORE_LAST_SUCCESS = Gauge(
    "recsys_model_store_last_success_timestamp_seconds",
    "Unix time of the last model store call that succeeded",
    ["op"],
)

# --- items / encoder -------------------------------------------------------------------------
ITEMS_ENCODED = Counter("recsys_items_encoded_total", "Item texts run through the encoder")
ITEM_CACHE_HITS = Counter("recsys_item_cache_hits_total", "Item vectors served from the cache")
ITEMS_UNKNOWN = Counter(
    "recsys_items_unknown_total", "Items seen in events but not in the catalogue (id-only)"
)

# --- publisher -------------------------------------------------------------------------------
STORE_FENCED_BATCHES = Counter(
    "recsys_store_fenced_batches_total",
    "Publisher batches the store refused: another replica had stored newer state of one of "
    "their partitions (this replica was a zombie)",
)
SLATES_PUBLISHED = Counter("recsys_slates_published_total", "Slates written to Kafka and the store")
FRESHNESS_SECONDS = Histogram(
    "recsys_freshness_seconds",
    "Event time of the triggering event to slate published",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0),
)
TOP_SCORE = Gauge("recsys_top_score_mean", "Mean top-1 score of the last published batch")
MODEL_SWAPS = Counter("recsys_model_swaps_total", "Hot reloads of a new model version")

# --- bounded in-memory state (recsys.lru) ---------------------------------------------------
CACHE_ENTRIES = Gauge("recsys_cache_entries", "Entries held by a bounded cache", ["cache"])
CACHE_CAPACITY = Gauge("recsys_cache_capacity", "The bound of a bounded cache", ["cache"])
CACHE_EVICTIONS = Counter(
    "recsys_cache_evictions_total", "Entries evicted from a bounded cache", ["cache"]
)

# --- drift -----------------------------------------------------------------------------------
DRIFT_DETECTED = Counter("recsys_drift_detected_total", "Drift detections, by signal", ["signal"])
DRIFT_ESTIMATE = Gauge(
    "recsys_drift_estimate", "Detector's current estimate, by signal", ["signal"]
)
DRIFT_LAST_TIMESTAMP = Gauge(
    "recsys_drift_last_detected_timestamp_seconds", "Unix time of the last detection", ["signal"]
)
DRIFT_REACTION_ACTIVE = Gauge(
    "recsys_drift_reaction_active", "1 while the learner's drift reaction is in force"
)
DRIFT_REACTIONS = Counter(
    "recsys_drift_reactions_total", "Drift reactions started, by signal", ["signal"]
)
DRIFT_REACTION_FACTOR = Gauge(
    "recsys_drift_reaction_factor",
    "Multiplier the drift reaction applies now (1 when inactive), by target",
    ["target"],
)
