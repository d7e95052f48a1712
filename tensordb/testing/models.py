"""Model builders that train jobs name as entry points (``tests.training_models:small_classifier``)."""

import keras


def small_classifier(units: int = 16, input_shape: tuple = (8, 8), classes: int = 2, scale: float = 1 / 255, **_: object) -> keras.Model:
    model = keras.Sequential([
        keras.Input(tuple(input_shape)),
        keras.layers.Rescaling(scale),
        keras.layers.Flatten(),
        keras.layers.Dense(units, activation="relu"),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model
