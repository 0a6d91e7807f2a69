"""The learner: hyper-parameters (:mod:`~recsys.learner.config`), the incremental trainer
(:mod:`~recsys.learner.trainer`), the online cadence and dedupe (:mod:`~recsys.learner.online`),
checkpoint I/O helpers (:mod:`~recsys.learner.checkpoint_io`) and the worker's sink and
``build(settings)`` (:mod:`~recsys.learner.sink`).
"""
