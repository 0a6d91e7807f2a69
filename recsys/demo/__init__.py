"""The closed-loop demo: the whole multi-process system on an embedded broker
(:mod:`~recsys.demo.run`), the user simulator (:mod:`~recsys.demo.simulator`), the baseline
arms (:mod:`~recsys.demo.arms`), the report (:mod:`~recsys.demo.report`) and the worker
processes' supervisor (:mod:`~recsys.demo.supervisor`).
"""
