"""The package root: what ``from tensordb import ...`` offers, what it costs, and the version."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import version

import pytest

import tensordb
from tests import REPO


def test_every_public_name_resolves_and_is_listed_for_type_checkers() -> None:
    for name in tensordb.__all__:
        assert getattr(tensordb, name) is not None, name
    assert set(tensordb.__all__) <= set(dir(tensordb))
    tree = ast.parse((REPO / "tensordb" / "__init__.py").read_text())
    checked = next(node for node in tree.body if isinstance(node, ast.If))  # the `if TYPE_CHECKING:` block
    seen = {alias.asname for node in checked.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == set(tensordb.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'TensorBoard'"):
        getattr(tensordb, "TensorBoard")


def test_importing_the_settings_does_not_import_the_sdk_keras_or_the_workers() -> None:
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, tensordb.config; print(' '.join(sys.modules))"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    heavy = [
        name
        for name in loaded
        if name.split(".")[0] in ("keras", "tensorflow", "workers") or name.startswith(("tensordb.client", "tensordb.compat"))
    ]
    assert heavy == []


def test_the_version_is_pyprojects_and_the_command_prints_it() -> None:
    assert tensordb.__version__ == version("tensordb")
    printed = subprocess.run(
        [sys.executable, "-m", "tensordb.cli", "--version"], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert printed.stdout.strip() == f"tensordb {tensordb.__version__}"
