"""The exception hierarchy: one root, so callers can catch everything recsys raises."""


class RecsysError(Exception):
    """Root of every error recsys raises on purpose."""


class ConfigError(RecsysError):
    """A setting is missing or invalid; the message names the setting."""


class CheckpointError(RecsysError):
    """A checkpoint is missing, partial, or fails its integrity check."""


class BrokerError(RecsysError):
    """The embedded broker could not be started or did not become ready."""


class DataError(RecsysError):
    """A data set could not be found or recognised (a malformed row is skipped, not raised)."""


class FencedError(RecsysError):
    """A write refused because a newer owner of the same partition already stored more: this
    process is a zombie (its partitions were reassigned while it worked). Its batch is dropped
    and its partitions go back to their last commit (see :class:`recsys.kafka.ConsumerLoop`)."""
