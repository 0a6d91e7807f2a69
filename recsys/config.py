"""Settings: frozen objects built once at start-up. Nothing else in recsys reads os.environ.

Every setting can be given as an environment variable ``RECSYS_<SECTION>__<FIELD>``
(e.g. ``RECSYS_KAFKA__BOOTSTRAP_SERVERS``); command-line flags override the environment.
A bad value raises :class:`~recsys.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_serializer,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from recsys.errors import ConfigError

ENV_PREFIX = "RECSYS_"

#: Reward weight per feedback type, the one definition (the reward rules default to it too).
DEFAULT_REWARD_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"click": 1.0, "add_to_cart": 2.0, "purchase": 5.0, "skip": -0.2, "dwell": 1.0, "rating": 1.0}
)
ENV_NESTED_DELIMITER = "__"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    """How to reach the Kafka cluster (or the embedded broker)."""

    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list")
    client_id: str = Field("recsys", description="Client id sent to the brokers")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol"
    )
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism when the protocol is SASL_*"
    )
    sasl_username: str | None = Field(None, description="SASL user name")
    sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")
    sasl_password_file: Path | None = Field(
        None, description="File holding the SASL password (e.g. a mounted Kubernetes Secret)"
    )
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL")
    session_timeout_ms: int = Field(10_000, ge=1000, description="Consumer group session timeout")
    heartbeat_interval_ms: int = Field(3_000, ge=100, description="Consumer heartbeat interval")
    max_poll_interval_ms: int = Field(300_000, ge=1000, description="Max time between polls")

    @model_validator(mode="after")
    def _check_sasl(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism is required when security_protocol is SASL_*")
            if not self.sasl_username:
                raise ValueError("sasl_username is required when security_protocol is SASL_*")
            if self.sasl_password is None and self.sasl_password_file is None:
                raise ValueError(
                    "sasl_password or sasl_password_file is required when "
                    "security_protocol is SASL_*"
                )
        if self.sasl_password_file is not None and not self.sasl_password_file.is_file():
            raise ValueError(f"sasl_password_file {self.sasl_password_file} is not a file")
        if self.ssl_cafile is not None and not self.ssl_cafile.is_file():
            raise ValueError(f"ssl_cafile {self.ssl_cafile} is not a file")
        return self

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by kafka-python producers, consumers and admin clients."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": [
                s.strip() for s in self.bootstrap_servers.split(",") if s.strip()
            ],
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self._password()
        if self.ssl_cafile is not None:
            kwargs["ssl_cafile"] = str(self.ssl_cafile)
        return kwargs

    def _password(self) -> str | None:
        if self.sasl_password_file is not None:
            return self.sasl_password_file.read_text().strip()
        return self.sasl_password.get_secret_value() if self.sasl_password else None


class TopicSettings(_Section):
    """Topic names and partition counts."""

    events: str = Field("recsys.events", description="Behaviour events from apps")
    rewards: str = Field("recsys.rewards", description="Joined rewards for the learner")
    recommendations: str = Field("recsys.recommendations", description="Published slates")
    items: str = Field("recsys.items", description="Item catalogue records")
    dlq: str = Field("recsys.events.dlq", description="Rejected events with reasons")
    item_vectors: str = Field(
        "recsys.item_vectors", description="Encoded item text vectors (encoder → learner)"
    )
    reward_state: str = Field(
        "recsys.rewards.state",
        description="Compacted changelog of the reward join's state (as many partitions as "
        "the events topic)",
    )
    partitions: int = Field(6, ge=1, description="Partitions for each topic created by recsys")
    replication_factor: int = Field(1, ge=1, description="Replication factor for created topics")

    def all(self) -> list[str]:
        return [
            self.events,
            self.rewards,
            self.recommendations,
            self.items,
            self.dlq,
            self.item_vectors,
        ]


class EventSettings(_Section):
    """Validation limits for incoming events."""

    max_bytes: int = Field(64 * 1024, ge=256, description="Largest accepted event message")
    max_clock_skew_ms: int = Field(
        5 * 60 * 1000, ge=0, description="How far in the future an event ts may be"
    )
    # The ceilings are recsys.events.MAX_ID_LENGTH_LIMIT and POSITION_LIMIT (int32, the replay
    # buffer's dtype): the internal-topic decoders accept anything up to them.
    max_id_length: int = Field(
        256, ge=1, le=4096, description="Longest id (event, user, item, request, model), in chars"
    )
    max_position: int = Field(1000, ge=0, le=2**31 - 1, description="Largest slate position")
    max_title_length: int = Field(1024, ge=1, description="Longest item title, in characters")


class StoreSettings(_Section):
    """Where recommendations and model versions are stored."""

    url: str = Field("sqlite:///recsys.db", description="SQLAlchemy URL (SQLite or PostgreSQL)")

    @model_validator(mode="after")
    def _check_url(self) -> StoreSettings:
        if not self.url.startswith(("sqlite", "postgresql")):
            raise ValueError("url must be a sqlite:// or postgresql:// SQLAlchemy URL")
        return self

    @field_serializer("url", when_used="json")
    def _hide_password(self, url: str) -> str:
        # JSON is what `recsys config` prints: never the database password. (Python-mode dumps
        # keep the real URL: the CLI merges its flags over them.)
        return redact_urls(url)


class ModelStoreSettings(_Section):
    """Where the learner's model versions go for the publishers to read.

    Empty ``url``: nowhere else; the learner's checkpoint directory is the publisher's watch
    directory (a shared ReadWriteMany volume). ``s3://bucket/prefix``: S3-compatible object
    storage; credentials come from the standard AWS chain (``AWS_*`` variables, IRSA, an
    instance profile), never from these settings (the patterns admit no user info).
    """

    url: str = Field(
        "",
        pattern=r"^(s3://[a-z0-9][a-z0-9.-]{1,62}(/[A-Za-z0-9!_.*'()/-]*)?)?$",
        description="Empty: the shared checkpoint directory only; or s3://bucket/prefix",
    )
    endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://[^/?#@\s]+/?$",
        description="S3-compatible endpoint, http(s)://host[:port] (unset: AWS S3)",
    )
    region: str | None = Field(None, description="S3 region (unset: the AWS environment's)")
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto", description="S3 bucket addressing (path: most S3-compatible servers)"
    )


class MetricsSettings(_Section):
    """The /metrics and /healthz endpoint of each worker."""

    host: str = Field("127.0.0.1", description="Address the metrics endpoint binds to")
    port: int = Field(9400, ge=0, le=65535, description="Port of the metrics endpoint (0: any)")


class DriftSettings(_Section):
    """Drift detectors over the learning signals, and the learner's reaction to a detection."""

    detector: Literal["adwin", "page_hinkley"] = Field(
        "adwin", description="river detector for numeric signals (ADWIN or Page-Hinkley)"
    )
    delta: float = Field(
        0.002, gt=0, lt=1, description="ADWIN confidence delta (smaller: fewer false alarms)"
    )
    ph_threshold: float = Field(50.0, gt=0, description="Page-Hinkley detection threshold")
    ph_min_instances: int = Field(30, ge=1, description="Page-Hinkley warm-up observations")
    popularity_window: int = Field(
        5000, ge=100, description="Item observations per window for the popularity shift"
    )
    popularity_threshold: float = Field(
        0.25, gt=0, description="PSI between consecutive windows that counts as drift"
    )
    reaction_duration_s: float = Field(
        300.0,
        ge=0,
        description="How long the learner's drift reaction lasts, in event time (0: none)",
    )
    reaction_exploration_factor: float = Field(
        2.0, ge=1, description="Multiplier on exploration temperature/epsilon during a reaction"
    )
    reaction_lr_factor: float = Field(
        1.0,
        gt=0,
        description="Multiplier on the learning rate during a reaction (1: none; 2 cost "
        "expected CTR in recsys eval sim)",
    )


class EncoderSettings(_Section):
    """The item encoder: a frozen pretrained text model and its on-disk vector cache."""

    model_path: Path | None = Field(
        None, description="Local Hugging Face model dir (unset: packaged all-MiniLM-L6-v2)"
    )
    cache_dir: Path = Field(Path(".cache/item-vectors"), description="On-disk item vector cache")
    batch_size: int = Field(64, ge=1, description="Texts per encoder forward pass")
    dim: int = Field(384, ge=1, description="Width of the encoder's vectors (384: MiniLM-L6)")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda[:N]")
    group_id: str = Field("recsys-encoder", description="Consumer group of the encoder worker")


class LearnerSettings(_Section):
    """The learner worker: model size, optimisation, cadence of checkpoints."""

    checkpoint_dir: Path = Field(Path("checkpoints"), description="Where model versions go")
    checkpoint_every_steps: int = Field(200, ge=1, description="Checkpoint after this many steps")
    checkpoint_every_s: float = Field(10.0, gt=0, description="...or after this many seconds")
    keep_checkpoints: int = Field(5, ge=1, description="Model versions kept on disk")
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda[:N]")
    group_id: str = Field("recsys-learner", description="Consumer group (for lag reporting)")
    dim: int = Field(64, ge=8, description="Width of user states and item embeddings")
    layers: int = Field(2, ge=1, description="Layers of the user-state transformer")
    max_history: int = Field(50, ge=1, description="Items of history that make a user's state")
    item_capacity: int = Field(1024, ge=1, description="Initial item rows (grows by doubling)")
    batch_size: int = Field(128, ge=1, description="Samples per gradient step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate")
    alpha: float = Field(
        0.0, ge=0, description="Weight of the contrastive (InfoNCE) term (off: no offline gain)"
    )
    objective: Literal["ce", "reinforce"] = Field(
        "ce",
        description="Logged-item loss: ce (clicked items) or reinforce (advantage-weighted, "
        "top-K off-policy correction; no gain measured offline or in recsys eval sim)",
    )
    topk: int = Field(10, ge=1, description="K of the top-K off-policy correction (reinforce)")
    weight_cap: float = Field(10.0, gt=0, description="Cap c of the importance weight")
    buffer_capacity: int = Field(100_000, ge=1, description="Replay buffer capacity")
    replay_ratio: float = Field(4.0, gt=0, description="Training samples per new reward")
    max_steps_per_batch: int = Field(
        32,
        ge=1,
        description="Most gradient steps per polled batch (32: a full poll of 1,000 rewards "
        "gets its replay budget, 1000 x 4 / 128; it bounds catch-up after a stall)",
    )
    reward_batch_multiplier: int = Field(
        8,
        ge=1,
        description="Batches of replayed rows the reward head fits per step (table lookups: "
        "cheap beside the policy network)",
    )
    reward_impression_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of impressions (and feedback joined to them) in the reward head's "
        "fit, organic feedback weighing 1 (0: organic only; set 1 where there is no organic "
        "feedback such as ratings)",
    )
    reward_refit_every: int = Field(
        50,
        ge=0,
        description="Steps between exact refits of the reward head (alternating least squares "
        "over the replay buffer; 0: gradient steps only)",
    )
    id_embeddings: bool = Field(True, description="Learn an id embedding per item")
    text: bool = Field(
        False,
        description="Item text vectors in the item tower and reward head (no gain measured "
        "offline or in recsys eval sim, new items included)",
    )
    max_users: int = Field(
        200_000,
        ge=1,
        description="Users whose history the learner holds (least recently active evicted "
        "first: their next events train from an empty history; checkpoints hold only these)",
    )
    max_items: int = Field(
        1_000_000,
        ge=1,
        le=1 << 24,
        description="Most item ids the learner's item tables hold; rewards and vectors for "
        "new items beyond it are dead-lettered (reason item_capacity)",
    )


class RewardSettings(_Section):
    """The reward worker: reward rules, the attribution-window join, its state bounds.

    Rules (``weights``, ``dwell_cap_s``, ``rating_centre``, ``rating_mean``,
    ``rating_prior_count``) may also come from ``rules_file`` (TOML or YAML with the same keys;
    ``weights`` merges over these): the file wins over the environment for the keys it sets.
    Times are event time (the events' ``ts``), never the wall clock.
    """

    group_id: str = Field("recsys-reward", description="Consumer group of the reward workers")
    weights: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_REWARD_WEIGHTS),
        description="Reward weight per feedback type (JSON object); missing types weigh 0",
    )
    dwell_cap_s: float = Field(
        60.0, gt=0, description="Dwell reward = weight * min(seconds, cap) / cap"
    )
    rating_centre: Literal["global", "user", "none"] = Field(
        "global",
        description="Rating reward = weight * (rating - centre); centre: rating_mean, the "
        "user's running mean (shrunk towards rating_mean), or 0",
    )
    rating_mean: float = Field(3.0, description="Global rating centre (and the user-mean prior)")
    rating_prior_count: float = Field(
        1.0, ge=0, description="Pseudo-ratings at rating_mean in a user's running mean"
    )
    rules_file: Path | None = Field(None, description="TOML/YAML file with reward rules")
    window_ms: int = Field(
        30 * 60 * 1000, ge=1, description="Attribution window after an impression (event time)"
    )
    allowed_lateness_ms: int = Field(
        2 * 60 * 1000,
        ge=0,
        description="Out-of-order tolerance: a window closes when the partition's max ts "
        "passes its end by this much",
    )
    late_rule: Literal["organic", "drop"] = Field(
        "organic",
        description="Feedback for an impression whose window is over: emit it as an organic "
        "reward (propensity unknown) or drop it (counted either way)",
    )
    late_retention_ms: int = Field(
        10 * 60 * 1000,
        ge=0,
        description="How long after its window an impression is remembered to recognise late "
        "feedback; later feedback counts as organic (the reward state topic holds about "
        "window + lateness + this much event time of impressions)",
    )
    dedupe_horizon_ms: int = Field(
        10 * 60 * 1000, ge=0, description="How long (event time) an event_id is remembered"
    )
    max_open_windows: int = Field(
        1_000_000, ge=1, description="Per partition; beyond it the oldest window closes early"
    )
    max_dedupe_entries: int = Field(
        2_000_000, ge=1, description="Per partition; beyond it the oldest event_ids are forgotten"
    )
    max_batch: int = Field(5000, ge=1, description="Most events handled per poll")
    linger_ms: int = Field(5, ge=0, description="Producer linger for reward records")
    compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "gzip",
        description="Compression of the rewards topic batches (gzip: smaller batches, so less "
        "CRC work for kafka-python on both ends; none, snappy, lz4 and zstd work too)",
    )

    @model_validator(mode="after")
    def _check_weights(self) -> RewardSettings:
        from recsys.events import FEEDBACK_TYPES

        unknown = set(self.weights) - FEEDBACK_TYPES
        if unknown:
            raise ValueError(
                f"weights: unknown feedback types {sorted(unknown)}; "
                f"allowed: {sorted(FEEDBACK_TYPES)}"
            )
        if self.rules_file is not None and not self.rules_file.is_file():
            raise ValueError(f"rules_file {self.rules_file} is not a file")
        return self


class PublisherSettings(_Section):
    """The publisher worker: model hot reload, slate size and exploration, micro-batching."""

    group_id: str = Field("recsys-publisher", description="Consumer group on the events topic")
    checkpoint_dir: Path | None = Field(
        None, description="Where to watch for model versions (unset: learner.checkpoint_dir)"
    )
    watch_interval_s: float = Field(1.0, gt=0, description="How often to look for a new version")
    k: int = Field(10, ge=1, le=1000, description="Items per slate")
    exploration: Literal["boltzmann", "epsilon", "greedy"] = Field(
        "boltzmann", description="Slate sampling: Boltzmann (Gumbel-top-k), epsilon-greedy, greedy"
    )
    temperature: float = Field(
        0.5,
        gt=0,
        description="Boltzmann temperature on model logits (0.5: best of 0.25-3 in `recsys eval "
        "sim` with the 300 s cooldown; 3 without one)",
    )
    epsilon: float = Field(0.1, ge=0, le=1, description="Epsilon-greedy exploration rate")
    cold_start_temperature: float = Field(
        1.0, gt=0, description="Temperature of the popularity policy for users without history"
    )
    cold_start: Literal["popularity", "model"] = Field(
        "model",
        description="Users without positive history once a model is loaded: the model's "
        "new-user state (its begin token) with the serving item value, or the popularity policy "
        "(model: +0.0015 [+0.0009, +0.0022] expected CTR in `recsys eval sim`, 3 seeds)",
    )
    history_len: int | None = Field(
        None, ge=1, description="Items of history kept per user (unset: learner.max_history)"
    )
    batch_interval_ms: int = Field(
        200, ge=1, description="Micro-batch: recompute changed users at most this long after"
    )
    refresh_batch_users: int = Field(
        2048, ge=1, description="Users per batch when refreshing everyone for a new version"
    )
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="Users per matrix product when ranking (unset: 1024 on CPU, ~256 MiB of "
        "scores per product on CUDA)",
    )
    device: str = Field("auto", description="auto (CUDA when present), cpu or cuda[:N]")
    seed: int | None = Field(None, description="Seed of the slate sampler (unset: random)")
    refresh_on_impression: bool = Field(
        True, description="Publish a fresh slate once the user's current one has been shown"
    )
    cooldown_s: float = Field(
        300.0,
        ge=0,
        description="Seconds an item shown to a user stays out of that user's slates (0: off; "
        "held in memory only, so a user reloaded from the store starts with none)",
    )
    max_users: int = Field(
        100_000,
        ge=1,
        description="Users whose state a publisher replica keeps in memory (least recently "
        "active evicted first; an evicted user is reloaded from the store on the next event)",
    )
    max_items: int = Field(
        2_000_000,
        ge=1,
        description="Distinct item ids a publisher replica tracks (later new ids are not "
        "tracked: set it above the catalogue size)",
    )


class Settings(BaseSettings):
    """All settings of a recsys process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        frozen=True,
        extra="forbid",
    )

    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    events: EventSettings = EventSettings()
    store: StoreSettings = StoreSettings()
    model_store: ModelStoreSettings = ModelStoreSettings()
    metrics: MetricsSettings = MetricsSettings()
    rewards: RewardSettings = RewardSettings()
    drift: DriftSettings = DriftSettings()
    encoder: EncoderSettings = EncoderSettings()
    learner: LearnerSettings = LearnerSettings()
    publisher: PublisherSettings = PublisherSettings()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Log level of workers and commands"
    )


def load_settings(**overrides: Any) -> Settings:
    """Build settings from ``overrides`` (e.g. CLI flags), then RECSYS_* variables, then defaults.

    ``overrides`` use nested dicts: ``load_settings(kafka={"bootstrap_servers": "h:9092"})``.
    Raises ConfigError naming the environment variable of each bad setting.
    """
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:  # e.g. a JSON-valued variable that is not JSON
        raise ConfigError(redact_urls(f"invalid configuration: {exc}")) from None


# Settings errors go to stderr and logs, so they never echo a secret. A field whose name matches
# this holds one (or, for sasl_*, sits next to one: a mis-set SASL variable may hold the password).
_SECRET_FIELD = re.compile(r"pass|secret|token|credential|sasl|private|key", re.IGNORECASE)
# The user-info password of a URL: scheme://user:PASSWORD@host (e.g. the store's PostgreSQL URL).
# (Greedy up to the last "@" before the host: an unencoded "@" in a password is hidden too.)
_URL_PASSWORD = re.compile(r"(?P<keep>\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:]*:)[^/?#\s]*@")
HIDDEN = "<hidden>"


def redact_urls(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL hidden."""
    return _URL_PASSWORD.sub(lambda m: f"{m['keep']}{HIDDEN}@", text)


def _describe(exc: ValidationError) -> str:
    lines = []
    secrets: set[str] = set()
    for err in exc.errors():
        path = [str(p) for p in err["loc"]]
        env = (
            ENV_PREFIX + ENV_NESTED_DELIMITER.join(p.upper() for p in path) if path else "settings"
        )
        value = err.get("input")
        _collect_secrets(path, value, secrets)
        if err["type"] == "extra_forbidden" or any(_SECRET_FIELD.search(p) for p in path):
            # An unknown variable's value may be anything (a mistyped password variable, say).
            shown = HIDDEN
        else:
            # A section- or settings-level error carries the whole section as its input.
            shown = repr(_redact(value))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
        lines.append(f"{env}: {err['msg']} (got {shown})")
    text = redact_urls("invalid configuration:\n  " + "\n  ".join(lines))
    # Last line of defence: a message (ours or pydantic's) that quoted a secret value.
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, HIDDEN)
    return text


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: HIDDEN if _SECRET_FIELD.search(str(k)) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, SecretStr):
        return str(value)  # '**********'
    if isinstance(value, str):
        return redact_urls(value)
    return value


def _collect_secrets(path: list[str], value: Any, out: set[str]) -> None:
    """Add to ``out`` the secret strings inside ``value`` (found at settings path ``path``)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _collect_secrets([*path, str(k)], v, out)
    elif isinstance(value, list | tuple):
        for v in value:
            _collect_secrets(path, v, out)
    elif isinstance(value, SecretStr):
        _add_secret(value.get_secret_value(), out)
    elif isinstance(value, str):
        if path and _SECRET_FIELD.search(path[-1]):
            _add_secret(value, out)
        for m in _URL_PASSWORD.finditer(value):
            _add_secret(m.group(0)[len(m["keep"]) : -1], out)


def _add_secret(value: str, out: set[str]) -> None:
    # Replacing a very short string would mangle unrelated text (and "" would match everywhere);
    # such values are still hidden where they stand, by field name and URL shape.
    if len(value) >= 4:
        out.add(value)


def settings_reference() -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, in declaration order."""
    rows: list[tuple[str, str, str]] = []
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for sub_name, sub in section.model_fields.items():
                env = f"{ENV_PREFIX}{name.upper()}{ENV_NESTED_DELIMITER}{sub_name.upper()}"
                default = sub.get_default(call_default_factory=True)
                rows.append((env, _default_text(default), sub.description or ""))
        else:
            rows.append(
                (
                    f"{ENV_PREFIX}{name.upper()}",
                    _default_text(field.default),
                    field.description or "",
                )
            )
    return rows


def _default_text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def settings_markdown() -> str:
    """The configuration table of the README, generated so it cannot drift from the code."""
    lines = ["| environment variable | default | meaning |", "|---|---|---|"]
    for env, default, description in settings_reference():
        lines.append(f"| `{env}` | `{default}` | {description} |")
    return "\n".join(lines)
