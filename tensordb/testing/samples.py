"""Synthetic ``sample/1`` records, ready to publish or ingest."""

from __future__ import annotations

import base64

import numpy as np


def image_samples(count: int, dataset: str = "train", seed: int = 0) -> list[dict]:
    """``count`` 8×8 uint8 images labelled ``y`` 0 or 1 (label 1 is 100 brighter, so a small model
    learns it in a few epochs), ids ``img00000``, ``img00001``, ..., the same for the same seed."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        label = i % 2
        image = rng.integers(0, 128, (8, 8), dtype=np.uint8) + label * 100
        records.append(
            {
                "schema": "sample/1",
                "sample_id": f"img{i:05d}",
                "dataset": dataset,
                "arrays": {"x": {"dtype": "uint8", "shape": [8, 8], "data": base64.b64encode(image.tobytes()).decode()}},
                "labels": {"y": label},
            }
        )
    return records
