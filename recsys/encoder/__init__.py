"""Item features: the pretrained text encoder (:mod:`~recsys.encoder.text`), the on-disk vector
cache (:mod:`~recsys.encoder.cache`), the item catalogue (:mod:`~recsys.encoder.catalog`) and
the encoder worker's sink and ``build(settings)`` (:mod:`~recsys.encoder.sink`).
"""
