"""Studies: hyper-parameter searches and k-fold experiments run as ordinary train jobs.

:mod:`~tensordb.studies.spec` (what a study is), :mod:`~tensordb.studies.space` (search spaces),
:mod:`~tensordb.studies.searchers` (grid, random, ASHA's rule), :mod:`~tensordb.studies.results`
(configurations, means and spreads, the best), :mod:`~tensordb.studies.scheduler` (the decisions,
run by the stream processors) and :mod:`~tensordb.studies.studies` (what users call).
"""
