"""Local Kafka (Tansu) and MongoDB (mongod) without Docker: ``tensordb services install|up|down|status|logs``.

``local.LocalServices`` orchestrates; one module per program (``tansu``, ``mongod``),
each running through ``process.ManagedProcess``.
"""

from tensordb.services.local import LocalServices
from tensordb.services.process import ServiceStatus

__all__ = ["LocalServices", "ServiceStatus"]
