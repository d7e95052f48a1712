"""Transform stages: preprocessing pipelines that derive samples from samples, on the stream.

:mod:`~tensordb.stages.spec` (what a stage is), :mod:`~tensordb.stages.derive` (calling its
function on one sample: deterministic ids, lineage, checked output) and
:mod:`~tensordb.stages.stages` (registering, pausing, backfill requests, counters). The stream
processors run them (``streams.stages``).
"""
