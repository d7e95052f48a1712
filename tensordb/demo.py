"""``tensordb demo``: the main job on the running services, narrated.

Starts the stream processors, publishes a few sample records (one of them broken), and shows what
the processors did with each: processed, or set aside as a dead letter with the reason.
"""

from __future__ import annotations

import base64
import time
import uuid
from pathlib import Path

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from streams.child import ProcessorsProcess
from tensordb.bus import Publisher, create_topics
from tensordb.config import Settings, Topic
from tensordb.dead_letters import COLLECTION as DEAD_LETTERS
from tensordb.store import Store

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


def run_demo(settings: Settings) -> int:
    create_topics(settings)
    ingest = settings.topic(Topic.INGEST)
    console.rule("[bold]TensorDB demo")
    console.print(f"Kafka {settings.kafka_bootstrap} · MongoDB {settings.mongo_uri} · project {settings.project!r}")
    with Store(settings) as store, ProcessorsProcess(settings, Path(settings.services_dir) / "run" / "logs" / "demo-processors.log") as processors:
        console.print(f"[green]✓[/] stream processors running (log: {processors.log_path})")
        before = store[DEAD_LETTERS].count_documents({"topic": ingest})
        with Publisher(settings) as publisher:
            for digit in (3, 1, 4):
                publisher.publish(Topic.INGEST, _sample(digit), key="demo")
            broken = orjson.dumps({**_sample(5), "dataset": None})  # any client could send this
            publisher.publish_bytes(ingest, broken, key="demo")
            publisher.publish(Topic.INGEST, _sample(9), key="demo")
        console.print(f"[green]✓[/] published 5 records to {ingest} (one with \"dataset\": null)")

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            progress = list(store["processor_progress"].find({"topic": ingest}))
            if sum(p["valid"] + p["invalid"] for p in progress) >= 5:
                break
            time.sleep(0.2)

        table = Table(title="What the processors did")
        for column in ("topic partition", "last offset", "processed", "dead letters"):
            table.add_column(column)
        for entry in progress:
            table.add_row(f"{entry['topic']}[{entry['partition']}]", str(entry["last_offset"]), str(entry["valid"]), str(entry["invalid"]))
        console.print(table)

        letters = Table(title="Dead letters (collection dead_letters)")
        for column in ("topic/partition/offset", "error", "reason"):
            letters.add_column(column, overflow="fold")
        for letter in store[DEAD_LETTERS].find({"topic": ingest}).sort("at", -1).limit(5):
            letters.add_row(f"{letter['partition']}/{letter['offset']}", letter["error_type"], letter["reason"])
        console.print(letters)
        new_letters = store[DEAD_LETTERS].count_documents({"topic": ingest}) - before
    console.print(f"[green]✓[/] {new_letters} new dead letter(s); the services keep running: `tensordb services down` stops them")
    return 0 if new_letters == 1 else 1
