"""One task: train an MLP with the hyper-parameters given as globals (TensorLayer's convention)."""

import os

import keras

from tensordb.compat.tensorhub import TensorHub

db = TensorHub(
    project_name=os.environ.get("TENSORDB_PROJECT", "tensorlayer-example")
)  # MongoDB: localhost:27017 unless TENSORDB_MONGO_URI
X_train, y_train, X_val, y_val, X_test, y_test = db.find_top_dataset("digits")

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((64,)),
        keras.layers.Rescaling(1 / 16),
        keras.layers.Dense(n_units1, activation="relu"),  # noqa: F821 - a hyper-parameter global
        keras.layers.Dropout(0.2),
        keras.layers.Dense(n_units2, activation="relu"),  # noqa: F821
        keras.layers.Dense(10, activation="softmax"),
    ]
)
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
history = model.fit(X_train, y_train, validation_data=(X_val, y_val), epochs=8, batch_size=64, verbose=0)
for epoch, (loss, accuracy) in enumerate(zip(history.history["loss"], history.history["accuracy"])):
    db.save_training_log(step=epoch, run_id=f"mlp-{n_units1}", loss=loss, accuracy=accuracy)  # noqa: F821

test_loss, test_accuracy = model.evaluate(X_test, y_test, verbose=0)
db.save_model(model, model_name="mlp", test_accuracy=test_accuracy, n_units1=n_units1, n_units2=n_units2)  # noqa: F821
db.close()
print(f"n_units={n_units1}: test accuracy {test_accuracy:.3f}")  # noqa: F821
