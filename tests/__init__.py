"""TensorDB's tests, in folders that mirror the layers (markers come from the folder, see conftest):
``unit/`` (no servers), ``integration/`` (the real broker and mongod), ``e2e/`` (the whole loop,
the browser, the ported example), ``security/`` (the attacks of SECURITY.md, both kinds).

Support code shared with bench/ is the shipped test kit, :mod:`tensordb.testing`."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
#: Scripts the tests run as ``task`` jobs (the session's settings trust this folder).
TASK_SCRIPTS = TESTS / "task_scripts"
