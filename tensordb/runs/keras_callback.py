"""A Keras callback that logs a user's own ``model.fit`` through a :class:`~tensordb.runs.logger.RunLogger`.

Per batch it logs the training metrics (phase ``train``, step = global batch count, the epoch);
per epoch the validation metrics (``val_loss`` → phase ``validation``, metric ``loss``) at the
same global step. Keras reports running epoch averages per batch, so the epoch-level training
metrics are merged into the record of the epoch's last batch rather than logged as a second
record for the same step (which the sink would drop as a duplicate). ``model.evaluate`` outside
``fit`` logs phase ``test``. ``on_epoch_saved(model, epoch, logs)`` runs after each epoch's logs
are queued, e.g. to save a model version; the callback never saves models itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import keras

from tensordb.runs.logger import RunLogger

EpochHook = Callable[[Any, int, dict[str, Any]], None]


def _numbers(logs: Mapping[str, Any] | None) -> dict[str, Any]:
    """The numeric entries of Keras' logs (callbacks may add others, e.g. strings)."""
    numbers = {}
    for name, value in (logs or {}).items():
        try:
            float(value)
        except (TypeError, ValueError):
            continue
        numbers[name] = value
    return numbers


class TensorDBCallback(keras.callbacks.Callback):
    """Log batches and epochs of ``model.fit`` (and ``model.evaluate``) to TensorDB.

    ``every_n_batches`` logs one batch in n (the epoch's final record is always logged). The
    global step keeps counting across several ``fit`` calls on the same callback.
    """

    def __init__(self, logger: RunLogger, every_n_batches: int = 1, on_epoch_saved: EpochHook | None = None) -> None:
        super().__init__()
        if every_n_batches < 1:
            raise ValueError(f"every_n_batches must be >= 1, got {every_n_batches}")
        self.logger = logger
        self.every_n_batches = every_n_batches
        self.on_epoch_saved = on_epoch_saved
        self.global_step = 0  # batches trained so far
        self.epoch = 0
        self._fitting = False
        self._pending: tuple[int, int, dict[str, Any]] | None = None  # (step, epoch, metrics) not yet logged

    def _log_pending(self, extra: Mapping[str, Any] | None = None) -> None:
        if self._pending is not None:
            step, epoch, metrics = self._pending
            self._pending = None
            merged = {**metrics, **(extra or {})}
            if merged:
                self.logger.log(step, phase="train", epoch=epoch, **merged)

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._fitting = True

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._log_pending()
        self._fitting = False

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.global_step += 1
        self._log_pending()  # one batch late: the epoch's last batch is merged with the epoch's metrics
        if self.global_step % self.every_n_batches == 0:
            self._pending = (self.global_step, self.epoch, _numbers(logs))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        numbers = _numbers(logs)
        train = {name: value for name, value in numbers.items() if not name.startswith("val_")}
        validation = {name[4:]: value for name, value in numbers.items() if name.startswith("val_")}
        if self._pending is None or self._pending[0] != self.global_step:
            self._log_pending()
            self._pending = (self.global_step, epoch, {})
        self._log_pending(train)
        if validation:
            self.logger.log(self.global_step, phase="validation", epoch=epoch, **validation)
        if self.on_epoch_saved is not None:
            self.on_epoch_saved(self.model, epoch, dict(logs or {}))

    def on_test_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._fitting:  # fit's validation pass: logged by on_epoch_end as val_*
            return
        numbers = _numbers(logs)
        if numbers:
            self.logger.log(phase="test", epoch=self.epoch, **numbers)
