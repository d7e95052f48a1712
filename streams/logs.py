"""The log sink: ``log/1`` records become documents of the ``logs`` collection, in bulk.

Idempotent by construction: a document's ``_id`` is (project, run, phase, step), and a batch is
unordered ``insert_many`` calls whose duplicate-key errors are ignored, so a redelivered record, or
a step logged twice, is stored once (the first write wins) and the rest of the batch still lands.
A record MongoDB refuses (a metric name with a '.' or '$'...) is dead-lettered on its own.

``tensordb processors`` runs it as its ``log-sink`` processor kind (batches of 10,000 records);
``python -m streams.logs`` runs more sinks alone (same group ``PREFIX.PROJECT.log-sink``: they
share the partitions).
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from streams.consumer import TopicProcessor
from streams.processing import ProcessorContext
from tensordb.config import Settings, Topic
from tensordb.errors import StorageError
from tensordb.infra.bus import Received
from tensordb.infra.store import Store, insert_new
from tensordb.runs.logger import LOGS, log_id

#: Large batches are inserted in chunks of this many documents by two threads, each chunk sent as
#: soon as it is built: building documents overlaps with mongod updating its indexes, and mongod
#: works on two chunks at once (measured on 2 cores: ~81,000/s against ~65,000/s for one call).
INSERT_CHUNK = 2500
_inserts = ThreadPoolExecutor(2, thread_name_prefix="tensordb-log-insert")
#: Batches persisted at once (logs may be stored in any order: the first write of a step wins):
#: while one batch waits for its journaled inserts, the next one's documents are built. Measured on
#: 2 cores, draining 200,000 queued records: ~45,000/s with one writer, 66,000-75,000/s with two.
WRITERS = 2
_log = logging.getLogger(__name__)


def log_document(project: str, record: dict[str, Any]) -> dict[str, Any]:
    """The stored form of one valid ``log/1`` record."""
    run_id, phase, step = record["run_id"], record["phase"], record["step"]
    return {
        "_id": log_id(run_id, phase, step),
        "project": project,
        "run_id": run_id,
        "job_id": record.get("job_id"),
        "phase": phase,
        "step": step,
        "epoch": record.get("epoch"),
        "wall_time": record["wall_time"],
        "metrics": record["metrics"],
        "tags": record.get("tags", {}),
    }


def handle_logs(context: ProcessorContext, batch: list[Received]) -> None:
    """Persist a batch of valid log records (see the module docstring)."""
    chunks = [batch[start : start + INSERT_CHUNK] for start in range(0, len(batch), INSERT_CHUNK)]
    if len(chunks) == 1:
        _insert_chunk(context, chunks[0])
        return
    pending = [_inserts.submit(_insert_chunk, context, chunk) for chunk in chunks]
    wait(pending)  # all chunks finish before the batch counts as persisted
    for insert in pending:
        insert.result()  # the first error, if any: the caller retries the whole batch (idempotently)


def _insert_chunk(context: ProcessorContext, chunk: list[Received]) -> None:
    store: Store = context.store
    _, refused = insert_new(store[LOGS], [log_document(store.project, received.valid_record) for received in chunk])
    if refused:
        context.dead_letters.divert_many([(chunk[index], StorageError(reason)) for index, reason in refused.items()])


def log_sink(settings: Settings, batch_size: int = 10_000) -> TopicProcessor:
    """The ``log-sink`` processor: large batches, large fetches (see the module docstring)."""
    fetch: dict[str, Any] = {"fetch.max.bytes": 64 * 1024 * 1024, "max.partition.fetch.bytes": 16 * 1024 * 1024}
    return TopicProcessor(settings, "log-sink", Topic.LOGS, handle_logs, batch_size=batch_size, writers=WRITERS, **fetch)


def tune_gc_for_batches() -> None:
    """Fewer garbage collections for a process that holds batches of thousands of small dicts.

    With the default thresholds the collector runs every 700 allocations and keeps re-scanning
    the batch in flight: ~20% of the sink's CPU. Measured on 2 cores: ~48,000 → ~60,000 records/s.
    """
    gc.freeze()  # what start-up allocated (modules, clients) is never garbage: stop scanning it
    gc.set_threshold(50_000, 20, 100)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m streams.logs``: run a log sink for the project in TENSORDB_* settings."""
    from tensordb.config import load_settings
    from tensordb.infra.logging import configure_logging
    from tensordb.infra.metrics import start_metrics

    parser = argparse.ArgumentParser(description="Persist the project's log records to MongoDB in bulk.")
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument(
        "--metrics-port", type=int, default=None, help="metrics port (default: TENSORDB_METRICS_PORT, else 9470; 0: none)"
    )
    args = parser.parse_args(argv)
    settings = load_settings()
    configure_logging(settings)
    start_metrics(settings, "processors", port=args.metrics_port)
    tune_gc_for_batches()
    sink = log_sink(settings, batch_size=args.batch_size)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: sink.stop())
    sink.run(on_ready=lambda: _log.info("log sink ready (group %s)", sink.group))
    _log.info("log sink stopped after processing %d records", sink.processed)
    return 0


if __name__ == "__main__":  # run the canonical module, not a second copy named __main__
    from streams.logs import main as _main

    raise SystemExit(_main())
