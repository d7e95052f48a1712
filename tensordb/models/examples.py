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


def digits_classifier(architecture: str = "mlp", units: int = 32) -> Any:
    """A dense network or a small CNN for the 8×8 digits: the k-fold study example compares both.

    Parameters
    ----------
    architecture:
        ``"mlp"`` (a dense hidden layer) or ``"cnn"`` (a 3×3 convolution and pooling before it).
    units:
        Width of the dense hidden layer (the convolution has ``units // 2`` filters).
    """
    import keras

    if architecture not in ("mlp", "cnn"):
        raise ValueError(f"architecture is 'mlp' or 'cnn', got {architecture!r}")
    inputs = keras.Input((8, 8))
    x = keras.layers.Rescaling(1 / 16)(inputs)
    if architecture == "cnn":
        x = keras.layers.Reshape((8, 8, 1))(x)
        x = keras.layers.Conv2D(max(units // 2, 4), 3, activation="relu", padding="same")(x)
        x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(units, activation="relu")(x)
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(x))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
