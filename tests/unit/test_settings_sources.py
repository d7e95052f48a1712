"""Where settings come from besides plain variables: a secrets directory (compose secrets), empty
variables (an env file's ``KEY=``), and the model server's policy."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tensordb.cli import main
from tensordb.config import SOURCE_VARIABLES, Settings
from tensordb.errors import ConfigurationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TENSORDB_"):
            monkeypatch.delenv(key)


def test_a_secret_file_wins_over_an_empty_or_set_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "TENSORDB_DASHBOARD_TOKEN").write_text("from-the-secret\n")  # the trailing newline is dropped
    monkeypatch.setenv("TENSORDB_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("TENSORDB_DASHBOARD_TOKEN", "")
    token = Settings().dashboard_token
    assert token is not None and token.get_secret_value() == "from-the-secret"
    monkeypatch.setenv("TENSORDB_DASHBOARD_TOKEN", "from-the-environment")
    token = Settings().dashboard_token
    assert token is not None and token.get_secret_value() == "from-the-secret"
    assert Settings().serve_token is None  # no file, no variable: the default


def test_a_missing_secrets_directory_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENSORDB_SECRETS_DIR", str(tmp_path / "absent"))
    with pytest.raises(ConfigurationError, match="TENSORDB_SECRETS_DIR"):
        Settings()


def test_an_empty_variable_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PROJECT", "KAFKA_OPTIONS", "TOPIC_PARTITIONS", "HTTP_ALLOWED_HOSTS", "SERVE_TOKEN", "CONFIG", "SECRETS_DIR"):
        monkeypatch.setenv(f"TENSORDB_{name}", "")
    assert Settings() == Settings.model_construct(
        **{name: field.get_default(call_default_factory=True) for name, field in Settings.model_fields.items()}
    )


def test_source_variables_are_not_fields() -> None:
    fields = {f"TENSORDB_{name.upper()}" for name in Settings.model_fields}
    assert not set(SOURCE_VARIABLES) & fields


def test_serve_needs_a_policy_from_the_option_or_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve"]) == 1
    assert "TENSORDB_SERVE_POLICY" in capsys.readouterr().err
