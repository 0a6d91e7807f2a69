"""`recsys worker learner`: rewards + item vectors → replay buffer → gradient steps → checkpoints.

The worker is :func:`recsys.learner.sink.build`; this module only runs it.
"""

from __future__ import annotations

from recsys.app import run_consumer
from recsys.config import Settings
from recsys.learner.sink import build


def run(settings: Settings) -> int:
    return run_consumer(settings, build(settings))
