"""Small Keras models that tests and benchmarks name as builder entry points
(``tensordb.testing.models:small_classifier``, ``tensordb.testing.models:two_tower``).

Not trusted by default: settings that run them list ``tensordb.testing.models`` in
``trusted_modules`` (the tests' session fixture and the loop benchmark do)."""

from __future__ import annotations

import keras
import numpy as np


def small_classifier(
    units: int = 16, input_shape: tuple = (8, 8), classes: int = 2, scale: float = 1 / 255, **_: object
) -> keras.Model:
    """A compiled rescale-flatten-dense classifier for small images (train jobs' entry point)."""
    model = keras.Sequential(
        [
            keras.Input(tuple(input_shape)),
            keras.layers.Rescaling(scale),
            keras.layers.Flatten(),
            keras.layers.Dense(units, activation="relu"),
            keras.layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class TwoTower(keras.Model):
    """Subclassed on purpose: ``to_json()`` succeeds but ``model_from_json`` cannot rebuild it, so
    the registry must rebuild it by calling its builder, :func:`two_tower`."""

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
