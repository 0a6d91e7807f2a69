"""Settings: environment variables, validation errors that name the setting, no leaked secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import load_settings, settings_markdown, settings_reference
from recsys.errors import ConfigError

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_and_environment(monkeypatch):
    assert load_settings().topics.events == "recsys.events"
    monkeypatch.setenv("RECSYS_KAFKA__BOOTSTRAP_SERVERS", "a:1, b:2")
    monkeypatch.setenv("RECSYS_TOPICS__PARTITIONS", "12")
    s = load_settings()
    assert s.kafka.client_kwargs()["bootstrap_servers"] == ["a:1", "b:2"]
    assert s.topics.partitions == 12


def test_overrides_beat_environment(monkeypatch):
    monkeypatch.setenv("RECSYS_STORE__URL", "sqlite:///env.db")
    assert load_settings(store={"url": "sqlite:///flag.db"}).store.url == "sqlite:///flag.db"


@pytest.mark.parametrize(
    ("env", "value"),
    [
        ("RECSYS_TOPICS__PARTITIONS", "0"),
        ("RECSYS_TOPICS__PARTITIONS", "many"),
        ("RECSYS_METRICS__PORT", "70000"),
        ("RECSYS_KAFKA__SECURITY_PROTOCOL", "TLS"),
        ("RECSYS_LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_values_fail_naming_the_variable(monkeypatch, env, value):
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=env):
        load_settings()


def test_bad_store_url_names_the_setting(monkeypatch):
    monkeypatch.setenv("RECSYS_STORE__URL", "mongodb://x")
    with pytest.raises(ConfigError, match="RECSYS_STORE"):
        load_settings()


def test_sasl_requires_credentials_and_hides_password(monkeypatch):
    monkeypatch.setenv("RECSYS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("RECSYS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    with pytest.raises(ConfigError, match="sasl_username"):
        load_settings()
    monkeypatch.setenv("RECSYS_KAFKA__SASL_USERNAME", "svc")
    monkeypatch.setenv("RECSYS_KAFKA__SASL_PASSWORD", "s3cret-value")
    s = load_settings()
    kwargs = s.kafka.client_kwargs()
    assert kwargs["security_protocol"] == "SASL_SSL"
    assert kwargs["sasl_plain_password"] == "s3cret-value"
    assert "s3cret-value" not in repr(s)
    assert "s3cret-value" not in s.model_dump_json()


def test_password_file_is_read(tmp_path, monkeypatch):
    secret = tmp_path / "password"
    secret.write_text("from-file\n")
    s = load_settings(
        kafka={
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "svc",
            "sasl_password_file": str(secret),
        }
    )
    assert s.kafka.client_kwargs()["sasl_plain_password"] == "from-file"
    with pytest.raises(ConfigError, match="sasl_password_file"):
        load_settings(kafka={"sasl_password_file": str(tmp_path / "missing")})


def test_settings_are_frozen():
    s = load_settings()
    with pytest.raises(Exception, match="frozen"):
        s.topics.partitions = 3  # type: ignore[misc]


def test_readme_documents_every_setting():
    text = README.read_text()
    missing = [env for env, _, _ in settings_reference() if f"`{env}`" not in text]
    assert not missing, (
        f"README.md lacks {missing}: run `python scripts/sync-readme-settings.py` "
        "(it pastes `recsys config --markdown` between the markers)"
    )
    assert settings_markdown() in text, "README settings table is stale: regenerate it"


def test_unparsable_json_variable_is_a_config_error(monkeypatch):
    # pydantic-settings raises its own SettingsError before validation: still a ConfigError
    # naming the section, not a traceback.
    monkeypatch.setenv("RECSYS_REWARDS__WEIGHTS", "click=1")
    with pytest.raises(ConfigError, match="rewards"):
        load_settings()
