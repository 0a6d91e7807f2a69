"""Fault-injection harnesses shared by the test suite and the benchmarks.

- :mod:`recsys.testing.streams`: seeded event streams, poison messages, sentinels.
- :mod:`recsys.testing.reward_kill`: the reward worker's SIGKILL test.
- :mod:`recsys.testing.outage`: broker outages on durable storage (pipeline and encoder).

They ship with the package so that an operator can run the same checks against a deployment's
own broker; none of the workers imports them.
"""
