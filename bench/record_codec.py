#!/usr/bin/env python
"""Record codec micro-benchmark: the per-sample CPU of a ``sample/1`` record's encoding (SDK side)
and decoding (ingest side), as records travel now and as they would with a binary message value.

No servers, one process, one core; figures are the best of 5 passes over N distinct samples.

- now: ``build_sample`` (base64 of the bytes) + ``records.encode`` (validate, JSON); ingest's
  ``records.decode`` (JSON, validate) + ``inline_bytes`` (strict base64 decoding, size checks).
- binary value (not implemented: a record format change): the same record without ``data`` as
  JSON, validated as now, then the raw bytes: ``4-byte header length + JSON header + bytes``. Ingest
  parses and validates the header and takes the bytes by slicing; no base64 either way, and the
  value is 21-25% smaller. Both sides still hash the bytes as now (not measured here: the same cost).

    .venv/bin/python bench/record_codec.py [--samples N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import harness  # noqa: F401 - puts the repository first on sys.path
import numpy as np
import orjson
from harness import make_console

from tensordb import records
from tensordb.config import Settings
from tensordb.data.samples import build_sample, dtype_name, inline_bytes, named_arrays, record_dtype, sample_fields
from tensordb.errors import SampleError

SHAPES = {"28×28": (28, 28), "64×64×3": (64, 64, 3)}
console = make_console(120)


def binary_value(array: np.ndarray, sample_id: str, label: int) -> bytes:
    """The message value of the binary format: the record with its bytes left out, then the bytes."""
    x = named_arrays(array)["x"]
    header = {"schema": records.Schema.SAMPLE, "sample_id": sample_id, "arrays": {"x": {"dtype": dtype_name(x.dtype), "shape": list(x.shape), "data": ""}},
              **sample_fields(dataset="d", labels={"y": label})}  # fmt: skip
    encoded = records.encode(header, records.Schema.SAMPLE)
    return len(encoded).to_bytes(4, "little") + encoded + x.data


def from_binary(value: bytes) -> tuple[dict[str, Any], bytes]:
    """Ingest's side of the binary format: the validated header and the array's bytes."""
    length = int.from_bytes(value[:4], "little")
    record = records.decode(value[4 : 4 + length], records.Schema.SAMPLE)
    data = value[4 + length :]
    spec = record["arrays"]["x"]
    if len(data) != int(np.prod(spec["shape"])) * record_dtype(spec["dtype"]).itemsize:
        raise SampleError("the bytes do not fit the header's shape and dtype")
    return record, data


def best(passes: int, count: int, work: Callable[[], object]) -> float:
    """The fastest of ``passes`` runs of ``work``, in µs per sample."""
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        work()
        seconds.append(time.perf_counter() - started)
    return min(seconds) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    count = parser.parse_args().samples
    store: Any = SimpleNamespace(settings=Settings())  # build_sample reads only the inline limit of small arrays
    for label, shape in SHAPES.items():
        images = np.random.default_rng(7).integers(0, 256, (count, *shape), dtype=np.uint8)
        ids = [f"s-{i:06d}" for i in range(count)]

        def publish_now() -> list[bytes]:
            return [
                records.encode(
                    build_sample(store, image, dataset="d", labels={"y": i % 10}, sample_id=ids[i]), records.Schema.SAMPLE
                )
                for i, image in enumerate(images)
            ]

        def publish_binary() -> list[bytes]:
            return [binary_value(image, ids[i], i % 10) for i, image in enumerate(images)]

        now, binary = publish_now(), publish_binary()
        sides = {
            "publish": (best(5, count, publish_now), best(5, count, publish_binary)),
            "ingest decode": (
                best(
                    5,
                    count,
                    lambda: [inline_bytes("x", records.decode(value, records.Schema.SAMPLE)["arrays"]["x"]) for value in now],
                ),
                best(5, count, lambda: [from_binary(value) for value in binary]),
            ),
        }
        size = (len(now[0]), len(binary[0]))
        console.print(f"[bold]{label}[/] uint8, {count} samples; message value {size[0]:,} B now, {size[1]:,} B binary")
        for side, (ours, theirs) in sides.items():
            console.print(
                f"  {side:14s} now {ours:6.1f} µs/sample   binary value {theirs:6.1f} µs/sample   saves {ours - theirs:5.1f} µs"
            )
        assert all(from_binary(value)[1] == images[i].tobytes() for i, value in enumerate(binary[:10]))
        assert orjson.loads(now[0])["sample_id"] == ids[0]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
