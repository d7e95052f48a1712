"""TensorDB's test kit, for TensorDB's own tests and benchmarks and for users testing their code
against real servers.

- :mod:`~tensordb.testing.servers`: ``servers`` (the configured servers, else our own Tansu and
  mongod on free ports) and ``fresh_project`` (own topics and database, removed afterwards);
- :mod:`~tensordb.testing.children`: ``tensordb processors``, ``worker``, ``predictor``, ``serve``
  and ``dashboard`` as child processes that are ready when ``start`` returns; ``Dashboard``, a
  running dashboard with an HTTP client;
- :mod:`~tensordb.testing.helpers`: ``free_port``, ``wait_for``, ``raw_database``;
- :mod:`~tensordb.testing.samples`: synthetic ``sample/1`` records;
- :mod:`~tensordb.testing.studies`: ``insert_study``, a finished study of any size written straight
  into MongoDB (for readers' tests and benchmarks);
- :mod:`~tensordb.testing.models`: small Keras builders to name as entry points (imports Keras,
  so not imported here; trust ``tensordb.testing.models`` to run them);
- :mod:`~tensordb.testing.synthetic` (a learning curve with a known optimum, an epoch function) and
  :mod:`~tensordb.testing.stages` (transform-stage functions): trust them to run them.

It sits in the top layer with the CLI (``[tool.importlinter]``): nothing else in TensorDB imports it.
"""

from tensordb.testing.children import (
    ChildProcess,
    Dashboard,
    dashboard_process,
    predictor_process,
    processors_process,
    server_process,
    worker_process,
)
from tensordb.testing.helpers import free_port, raw_database, wait_for
from tensordb.testing.samples import image_samples
from tensordb.testing.servers import Servers, fresh_project, servers
from tensordb.testing.studies import insert_study

__all__ = [
    "ChildProcess",
    "Dashboard",
    "Servers",
    "dashboard_process",
    "predictor_process",
    "processors_process",
    "raw_database",
    "server_process",
    "worker_process",
    "free_port",
    "wait_for",
    "image_samples",
    "insert_study",
    "fresh_project",
    "servers",
]
