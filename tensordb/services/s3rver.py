"""s3rver (npm), an S3 API over a local directory: where Tansu keeps records in durable mode.

Clients never talk to it, only Tansu does, so its port is not a setting: the first start picks a
free one and records it in ``RUN/s3rver/port``; later starts reuse it while it is free, so a broker
still running against the old address finds s3rver again.
"""

from __future__ import annotations

from pathlib import Path

from tensordb.services.process import ManagedProcess, ServiceStatus, accepts_connections, free_port, port_is_free

BUCKET = "tansu"  # the bucket of tansu's s3:// storage engine URL


class S3rver:
    """s3rver on ``host`` with its objects in ``RUN/s3rver/data``."""

    def __init__(self, executable: Path, run_dir: Path, host: str) -> None:
        self.process = ManagedProcess("s3rver", executable, run_dir)
        self.data_dir = run_dir / "s3rver" / "data"
        self.port_path = run_dir / "s3rver" / "port"
        self.host = host

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port_path.read_text().strip()}" if self.port_path.is_file() else "-"

    def start(self) -> None:
        port = int(self.port_path.read_text()) if self.port_path.is_file() else 0
        if not port or not port_is_free(self.host, port):
            port = free_port(self.host)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port_path.write_text(f"{port}\n")
        # --configure-bucket takes the bucket name then optional config files: it must come last.
        self.process.start(
            ["-d", str(self.data_dir), "-a", self.host, "-p", str(port), "--allow-mismatched-signatures"]
            + ["--configure-bucket", BUCKET]
        )
        self.process.wait_ready(lambda: accepts_connections(self.host, port), timeout=30)

    def stop(self) -> bool:
        return self.process.stop()

    def status(self, changed: bool = False) -> ServiceStatus:
        return self.process.status(self.address, "tansu storage (up --durable)", changed)
