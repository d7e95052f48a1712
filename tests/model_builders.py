"""Builder entry points for the model-registry tests (``tests.model_builders:two_tower``): a
subclassed Keras model, which cannot be described as Keras JSON, rebuilt by importing a function."""

from __future__ import annotations

import keras
import numpy as np


class TwoTower(keras.Model):
    """Subclassed on purpose: ``to_json()`` succeeds but ``model_from_json`` cannot rebuild it."""

    def __init__(self, units: int = 4, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.head = keras.layers.Dense(2)

    def call(self, inputs):  # noqa: ANN001, ANN201 - Keras signature
        return self.head(self.hidden(inputs))


def two_tower(units: int = 4, build: bool = False) -> keras.Model:
    """An uncompiled TwoTower; without weights unless ``build`` (the registry then creates them by
    calling it on zeros of the stored input shape)."""
    model = TwoTower(units)
    if build:
        model(np.zeros((1, 8), dtype=np.float32))  # subclassed models create their weights when first called
    return model
