"""The ``predictions`` collection: the stored answer of each streaming predict request (``_id`` =
request id), written by ``tensordb predictor`` before it publishes the answer, so that a redelivered
request gets its first answer again; read by transform stages that take a model's predictions
(their backfills and lag). Kept a week (a TTL index on ``stored_at``)."""

PREDICTIONS = "predictions"


def answered_samples(model: str) -> dict[str, object]:
    """The stored answers of ``model`` that have outputs for a stored sample (what a stage can chain)."""
    return {"model": model, "sample_id": {"$exists": True}, "error": {"$exists": False}}
