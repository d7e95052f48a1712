"""``tensordb demo``: the main job on the running services, narrated.

Starts the stream processors, publishes a few sample records (one of them broken), shows what was
persisted and what was set aside as a dead letter with the reason, and streams a cohort.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from tensordb.bus import Publisher, create_topics
from tensordb.child import processors_process
from tensordb.client import TensorDB
from tensordb.config import Settings, Topic
from tensordb.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.samples import SAMPLES

console = Console()


def _sample(digit: int) -> dict:
    image = np.full((8, 8), digit * 16, dtype=np.uint8)
    return {
        "schema": "sample/1",
        "sample_id": f"demo-{uuid.uuid4().hex[:12]}",
        "dataset": "demo-digits",
        "arrays": {"image": {"dtype": "uint8", "shape": [8, 8], "data": base64.b64encode(image.tobytes()).decode()}},
        "labels": {"digit": digit},
        "source": "tensordb demo",
    }


def _wait(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}; see the processors' log")
        time.sleep(0.2)


def run_demo(settings: Settings) -> int:
    create_topics(settings)
    ingest = settings.topic(Topic.INGEST)
    console.rule("[bold]TensorDB demo")
    console.print(f"Kafka {settings.kafka_bootstrap} · MongoDB {settings.mongo_uri} · project {settings.project!r}")
    log_path = Path(settings.services_dir) / "run" / "logs" / "demo-processors.log"
    started = datetime.now(UTC)
    with TensorDB(settings) as db, processors_process(settings, log_path):
        console.print(f"[green]✓[/] stream processors running (log: {log_path})")
        samples = [_sample(digit) for digit in (3, 1, 4, 1)]
        with Publisher(settings) as publisher:
            for record in samples[:2]:
                publisher.publish(Topic.INGEST, record, key="demo")
            broken = orjson.dumps({**_sample(5), "dataset": None})  # any Kafka client could send this
            publisher.publish_bytes(ingest, broken, key="demo")
            for record in samples[2:]:
                publisher.publish(Topic.INGEST, record, key="demo")
        console.print(f"[green]✓[/] published 5 records to {ingest}, the third with \"dataset\": null")

        ids = [record["sample_id"] for record in samples]
        _wait(lambda: db.store[SAMPLES].count_documents({"_id": {"$in": ids}}) == len(ids), "the samples")
        table = Table(title="Persisted: one metadata document per sample (collection samples), bytes in GridFS")
        for column in ("sample id", "dataset", "label", "array", "sha256", "imported at"):
            table.add_column(column)
        for doc in db.store[SAMPLES].find({"_id": {"$in": ids}}).sort("origin.offset", 1):
            array = doc["arrays"]["image"]
            table.add_row(doc["_id"], doc["dataset"], str(doc["labels"]["digit"]), f"{array['dtype']}{array['shape']}",
                          array["sha256"][:12] + "…", doc["imported_at"].strftime("%H:%M:%S.%f")[:-3])
        console.print(table)

        letters = Table(title="Set aside: dead letters (topic and collection dead_letters)")
        for column in ("topic/partition/offset", "error", "reason"):
            letters.add_column(column, overflow="fold")
        new_letters = list(db.store[DEAD_LETTERS].find({"topic": ingest, "at": {"$gte": started}}))
        for letter in new_letters:
            letters.add_row(f"{letter['topic']}/{letter['partition']}/{letter['offset']}", letter["error_type"], letter["reason"])
        console.print(letters)

        recent = db.cohort({"dataset": "demo-digits"}, limit=3, x="image", y="digit")
        x, y = next(iter(recent.stream(batch_size=3)))
        console.print(f"[green]✓[/] cohort \"last 3 imported\" streams a batch x{list(x.shape)} {x.dtype}, y={y.tolist()}")
    console.print("The services keep running; `tensordb services status` shows them, `tensordb services down` stops them.")
    return 0 if len(new_letters) == 1 else 1
