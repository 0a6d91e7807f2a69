"""recsys: a streaming online-learning recommender."""

from recsys.errors import ConfigError, RecsysError

__all__ = ["ConfigError", "RecsysError"]
__version__ = "0.1.0"
