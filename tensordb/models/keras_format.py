"""The Keras format of a model version: how a model is described (Keras JSON, or a trusted builder
entry point with JSON arguments), its weights as a pickle-free ``.npz``, its compile configuration,
and how a stored version is rebuilt. Nothing stored is ever unpickled or executed: what a document
names is checked against the trusted modules before anything is imported.
"""

from __future__ import annotations

import functools
import io
import json
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from tensordb.config import Settings
from tensordb.errors import EntryPointError, ModelFormatError, UntrustedCodeError
from tensordb.infra import versioning
from tensordb.infra.trusted import bind_arguments, check_keras_config, load_entry_point


def weights_to_npz(weights: list[np.ndarray]) -> bytes:
    """``.npz`` bytes of a weight list (members ``w00000``, ``w00001``... in order), never pickled."""
    buffer = io.BytesIO()
    try:
        np.savez(buffer, allow_pickle=False, **{f"w{index:05d}": np.asarray(w) for index, w in enumerate(weights)})
    except ValueError as exc:  # object arrays
        raise ModelFormatError(f"model weights must be numeric arrays (no pickle): {exc}") from exc
    return buffer.getvalue()


def npz_to_weights(data: bytes) -> list[np.ndarray]:
    """The weight list stored by :func:`weights_to_npz`, in order (never unpickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            names = sorted(archive.files, key=lambda member: int(member[1:]))
            return [archive[member] for member in names]
    except (ValueError, OSError) as exc:
        raise ModelFormatError(f"stored parameters are not a pickle-free .npz of weights: {exc}") from exc


def architecture_fields(
    model: Any, builder: str | None, builder_kwargs: dict[str, Any] | None, settings: Settings
) -> dict[str, Any]:
    """The fields that let :func:`build_model` rebuild ``model``: Keras JSON, or a builder entry point
    (refused now if this process would refuse to load it: untrusted, or ``builder_kwargs`` it does not take)."""
    if builder is not None:
        try:
            kwargs = json.loads(json.dumps(builder_kwargs or {}, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ModelFormatError(f"builder_kwargs must be JSON (strings, numbers, lists, objects): {exc}") from exc
        versioning.check_keys(kwargs, "builder_kwargs")
        _builder(builder, kwargs, settings, "cannot save the model")
        build_config = model.get_build_config() if getattr(model, "built", False) else None
        return {"builder": builder, "builder_kwargs": kwargs, "build_config": json.loads(json.dumps(build_config))}
    if builder_kwargs is not None:
        raise ModelFormatError("builder_kwargs needs builder='package.module:function'")
    if not _json_describable(model):
        raise ModelFormatError(
            f"a {type(model).__name__} (subclassed Keras model) cannot be rebuilt from JSON: save it with "
            "builder='package.module:function' (a function importable where the model is loaded, returning "
            "the model) and builder_kwargs={...}, or register the class with "
            "@keras.saving.register_keras_serializable and give it get_config()"
        )
    return {"architecture_json": model.to_json()}


def _json_describable(model: Any) -> bool:
    """Sequential and functional models, and registered serialisable classes, round-trip through JSON."""
    import keras
    from keras.src.models.functional import Functional

    cls = type(model)
    if cls in (keras.Sequential, Functional):
        return True
    try:
        return keras.saving.get_registered_object(keras.saving.get_registered_name(cls)) is cls
    except Exception:  # noqa: BLE001 - anything unexpected means "not registered"
        return False


def private_weights(weights: list[np.ndarray], backend: str) -> list[np.ndarray]:
    """Weights no later training step can change: copies, except where they already are.

    With TensorFlow, ``get_weights`` reads each variable into a new tensor and NumPy array that
    owns its memory (in-place optimizer updates leave it alone), so copying again would only double
    the time the training loop waits. Other backends may hand out views of the live variables
    (NumPy, PyTorch on CPU): those are copied.
    """
    if backend == "tensorflow":
        return [w if w.flags.owndata else w.copy() for w in weights]
    return [w.copy() for w in weights]


def _builder(builder: object, kwargs: dict[str, Any], settings: Settings, what: str) -> Callable[[], Any]:
    """The builder entry point, checked against the trusted modules, imported and bound to ``kwargs``."""
    try:
        function = load_entry_point(builder, settings)
        return functools.partial(function, **bind_arguments(function, str(builder), kwargs))
    except EntryPointError as exc:
        raise ModelFormatError(f"{what}: {exc}") from exc


def build_model(info: dict[str, Any], settings: Settings) -> Any:
    """A fresh (unweighted) model from a stored architecture: Keras JSON, or the builder entry point.

    The document may have been written by anyone with access to MongoDB: what it names is checked
    against ``settings`` before anything is imported (UntrustedCodeError otherwise).
    """
    import keras

    what = f"{info['name']} v{info['version']}"
    if info.get("architecture_json"):
        try:
            config = json.loads(info["architecture_json"])
        except ValueError as exc:
            raise ModelFormatError(f"the stored architecture of {what} is not JSON: {exc}") from exc
        check_keras_config(config, settings, f"the architecture of {what}")
        try:
            return keras.models.model_from_json(info["architecture_json"])
        except Exception as exc:
            raise ModelFormatError(f"cannot rebuild {what} from its Keras JSON: {exc}") from exc
    model = _builder(info.get("builder"), info.get("builder_kwargs") or {}, settings, f"cannot rebuild {what}")()
    expected = info["parameters"].get("arrays", 0)
    build_config = info.get("build_config") or {}
    if len(model.weights) < expected and build_config.get("input_shape") is not None:
        # a subclassed model without build() only creates its weights when called: call it once on zeros
        model(_zeros(build_config["input_shape"]))
    return model


def _zeros(shape: Any) -> Any:
    """Float32 zeros for a stored input shape (None dimensions as 1), nested like the shape."""
    if isinstance(shape, dict):
        return {key: _zeros(item) for key, item in shape.items()}
    if isinstance(shape, (list, tuple)) and shape and all(isinstance(d, (list, tuple, dict)) for d in shape):
        return [_zeros(item) for item in shape]
    return np.zeros([1 if d is None else d for d in shape], dtype=np.float32)


def compile_json(model: Any) -> str | None:
    """The model's compile configuration (optimizer, loss, metrics) as JSON text, if compiled and JSON-able."""
    try:
        config = model.get_compile_config() if getattr(model, "compiled", False) else None
        return None if config is None else json.dumps(config)
    except (TypeError, ValueError) as exc:
        warnings.warn(f"the compile configuration of the model is not JSON and was not saved: {exc}", stacklevel=3)
        return None


def compile_loaded(model: Any, info: dict[str, Any], settings: Settings) -> None:
    """Compile a loaded model as it was when saved (unless its builder already compiled it)."""
    if not info.get("compile_json") or getattr(model, "compiled", False):
        return
    try:
        config = json.loads(info["compile_json"])
        check_keras_config(config, settings, f"the compile configuration of {info['name']} v{info['version']}")
        model.compile_from_config(config)
    except UntrustedCodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model still predicts; say why evaluate/fit need compile()
        warnings.warn(
            f"{info['name']} v{info['version']} was loaded uncompiled: its compile configuration could not be "
            f"restored ({exc}); call model.compile(...) before fit/evaluate",
            stacklevel=3,
        )


def count_members(data: bytes) -> int:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return len(archive.namelist())
