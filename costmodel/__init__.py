"""Stage 4: the fitted cost model and configuration search.

Modules, in the order data flows:

``space``       configurations as columns (:class:`~moesim.costmodel.space.ConfigSet`) and the commands that
                reproduce one
``features``    trace features: per-cell miss counts at every cache size from one-pass stack distances
``backbone``    analytic TTFT / TPOT / makespan at every cache size from miss counts and the profile's op costs
``memory``      peak GPU memory: the simulator's own arithmetic, vectorised
``context``     one (trace, profile): the tables above, gathered per configuration
``correction``  the fitted correction (gradient-boosted trees or ridge), exported to plain arrays
``model``       backbone x correction, loaded from the versioned artifact in ``artifacts/``
``dataset``     sampling plans and the simulator runs they need, cached on disk
``fit``         cross-validation of the candidates and the artifact
``search``      ``moesim search``: screen, confirm with the simulator, Pareto fronts
``screen``      ``moesim sweep --screen``: which grid points are predicted dominated
``report``      plots, Markdown, CSV and JSON of a search
``cli``         ``moesim search`` and ``moesim costmodel fit|show|predict``
"""
