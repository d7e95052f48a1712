# The task script of TensorLayer's database docs ("Task distribution"), with Keras: n_units1 and
# n_units2 arrive as globals; test_accuracy is the result the distributor asked to keep.
import keras

from tensordb import TensorHub

db = TensorHub()  # the runner hands its settings to the script through TENSORDB_* variables
X_train, y_train, X_val, y_val, X_test, y_test = db.find_top_dataset("mnist")
keras.utils.set_random_seed(0)
net = keras.Sequential([
    keras.Input((784,)),
    keras.layers.Dense(n_units1, activation="relu"),  # noqa: F821 - a hyper-parameter global
    keras.layers.Dense(n_units2, activation="relu"),  # noqa: F821
    keras.layers.Dense(10, activation="softmax"),
])  # fmt: skip
net.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
net.fit(X_train, y_train, validation_data=(X_val, y_val), epochs=1, verbose=0)
test_accuracy = float(net.evaluate(X_test, y_test, verbose=0)[1])
db.save_model(net, test_accuracy=test_accuracy, name=f"{n_units1}-{n_units2}")  # noqa: F821
db.close()
