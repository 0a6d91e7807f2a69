"""The publisher: histories, hot-swapped policy and micro-batched slates
(:mod:`~recsys.publisher.core`), and the worker's sink and ``build(settings)``
(:mod:`~recsys.publisher.sink`).
"""
