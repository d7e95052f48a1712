"""TensorDB's own example model builders: the only entry points trusted without configuration
(:data:`tensordb.infra.trusted.ALWAYS_TRUSTED`), so the demo runs on a fresh installation."""

from __future__ import annotations

from typing import Any


def digits_mlp(units: int = 64) -> Any:
    """The demo's model for scikit-learn's 8×8 digits: rescale, flatten, one hidden layer.

    Parameters
    ----------
    units:
        Width of the hidden layer (the demo's hyper-parameter).
    """
    import keras

    model = keras.Sequential([
        keras.Input((8, 8)),
        keras.layers.Rescaling(1 / 16),
        keras.layers.Flatten(),
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])  # fmt: skip
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
