"""The connections a long-running part of TensorDB holds: one store (MongoDB), one publisher
(Kafka) and one model registry over them, opened together and closed in the right order.

The stream processors, the workers and the model server each hold one, so a setting that changes
how TensorDB connects changes it in one place. (The SDK, :class:`tensordb.client.TensorDB`, opens
its publisher and registry only on first use: reading data needs no Kafka connection.)
"""

from __future__ import annotations

from dataclasses import dataclass

from tensordb.config import Settings
from tensordb.infra.bus import Publisher
from tensordb.infra.store import Store
from tensordb.models.registry import ModelRegistry


@dataclass(frozen=True)
class Runtime:
    """A store, a publisher and a model registry of one project (see the module docstring)."""

    settings: Settings
    store: Store
    publisher: Publisher
    registry: ModelRegistry

    @classmethod
    def open(cls, settings: Settings, *, server_wait_ms: int = 30_000, flush_timeout: float = 30.0) -> Runtime:
        """Connect to MongoDB and Kafka for ``settings``' project.

        Parameters
        ----------
        settings:
            Where the servers are, and the project.
        server_wait_ms:
            How long a MongoDB call waits for a reachable server (processors use a few seconds, so
            that a stop request is noticed during an outage).
        flush_timeout:
            How long a flush waits for the broker's acknowledgements before raising.
        """
        store = Store(settings, server_wait_ms=server_wait_ms)
        publisher = Publisher(settings, flush_timeout=flush_timeout)
        try:
            registry = ModelRegistry(store, publisher)  # creates its unique indexes: MongoDB must answer
        except BaseException:
            publisher.close(0)  # nothing was published yet
            store.close()
            raise
        return cls(settings, store, publisher, registry)

    def close(self, timeout: float | None = None) -> None:
        """Wait for model uploads, flush the publisher (``timeout`` seconds at most, raising
        :class:`~tensordb.errors.DeliveryError` for records left unacknowledged) and disconnect."""
        try:
            self.registry.close()
            self.publisher.close(timeout)
        finally:
            self.store.close()
