"""Serving: model loading for inference (:mod:`~recsys.serving.model`), the model watcher
(:mod:`~recsys.serving.watcher`) and the device resolver (:mod:`~recsys.serving.device`).

Nothing here imports training code: the publisher depends on these modules, not on the learner.
Import the submodules directly (this package re-exports nothing, so that the policy can use the
device resolver without importing the model loader).
"""
