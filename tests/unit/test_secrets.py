"""No secret reaches stderr or a log: settings errors, `recsys config`, and library DEBUG logs.

The secrets are set the way a deployment sets them (environment variables); every captured
output is then searched for them.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.cli import main
from recsys.config import KafkaSettings, load_settings
from recsys.errors import ConfigError
from recsys.kafka import make_admin
from recsys.logsafe import SecretFilter, install_secret_filter, settings_secrets

SASL_PASSWORD = "sasl-Pa55w0rd-7f3a"
PG_PASSWORD = "pg-Pa55w0rd-91c2"
PG_URL = f"postgresql+psycopg://recsys:{PG_PASSWORD}@db.internal:5432/recsys"
SECRETS = (SASL_PASSWORD, PG_PASSWORD)


def _assert_clean(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("RECSYS_KAFKA__SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("RECSYS_STORE__URL", PG_URL)
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "named"),
    [
        # section-level (model validator) errors: pydantic's input is the whole section
        ({"RECSYS_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"}, "RECSYS_KAFKA"),
        (
            {
                "RECSYS_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "RECSYS_KAFKA__SASL_MECHANISM": "PLAIN",
            },
            "RECSYS_KAFKA",
        ),
        ({"RECSYS_STORE__URL": f"mysql://recsys:{PG_PASSWORD}@db.internal/recsys"}, "RECSYS_STORE"),
        # a whole section given as one JSON variable
        (
            {"RECSYS_KAFKA": json.dumps({"sasl_password": SASL_PASSWORD, "client_id": 5})},
            "RECSYS_KAFKA__CLIENT_ID",
        ),
        (
            {
                "RECSYS_KAFKA": json.dumps(
                    {"sasl_plain_password": SASL_PASSWORD, "security_protocol": "SASL_SSL"}
                )
            },
            "RECSYS_KAFKA",
        ),
        # the password put in the wrong SASL variable, or in a mistyped one
        ({"RECSYS_KAFKA__SASL_MECHANISM": SASL_PASSWORD}, "RECSYS_KAFKA__SASL_MECHANISM"),
        ({"RECSYS_KAFKA__SASL_PASWORD": SASL_PASSWORD}, "RECSYS_KAFKA__SASL_PASWORD"),
        ({"RECSYS_STORE__URI": PG_URL}, "RECSYS_STORE__URI"),
        # a field-level error beside the secrets: the section input is not echoed either
        ({"RECSYS_KAFKA__SESSION_TIMEOUT_MS": "soon"}, "RECSYS_KAFKA__SESSION_TIMEOUT_MS"),
    ],
)
def test_settings_errors_never_show_a_secret(
    secret_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    named: str,
) -> None:
    for name, value in env.items():
        secret_env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert named in message  # still says which setting is wrong
    _assert_clean(message)
    # The same error as the `recsys` command prints it.
    assert main(["config"]) == 2
    out, err = capsys.readouterr()
    assert named in err
    _assert_clean(out, err)


def test_section_error_keeps_harmless_values_and_hides_the_rest(
    secret_env: pytest.MonkeyPatch,
) -> None:
    secret_env.setenv("RECSYS_STORE__URL", f"mysql://recsys:{PG_PASSWORD}@db.internal/recsys")
    with pytest.raises(ConfigError) as info:
        load_settings()
    # The URL is still recognisable (scheme, user, host): only its password is gone.
    assert "mysql://recsys:<hidden>@db.internal/recsys" in str(info.value)
    secret_env.setenv("RECSYS_STORE__URL", PG_URL)
    secret_env.setenv("RECSYS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "'security_protocol': 'SASL_SSL'" in str(info.value)
    assert "'sasl_password': '<hidden>'" in str(info.value)


def test_recsys_config_hides_the_secrets(
    secret_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    secret_env.setenv("RECSYS_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    secret_env.setenv("RECSYS_KAFKA__SASL_MECHANISM", "SCRAM-SHA-512")
    secret_env.setenv("RECSYS_KAFKA__SASL_USERNAME", "recsys")
    assert main(["config"]) == 0
    out, err = capsys.readouterr()
    _assert_clean(out, err)
    shown = json.loads(out)
    assert shown["kafka"]["sasl_password"] == "**********"
    assert shown["store"]["url"] == "postgresql+psycopg://recsys:<hidden>@db.internal:5432/recsys"
    # Only the printed form is redacted: the settings themselves keep the real values.
    settings = load_settings()
    assert settings.store.url == PG_URL
    assert settings.kafka.client_kwargs()["sasl_plain_password"] == SASL_PASSWORD
    assert sorted(settings_secrets(settings)) == sorted(SECRETS)
    # From a password file, as Kubernetes mounts it.
    secret_file = tmp_path / "password"
    secret_file.write_text(SASL_PASSWORD + "\n")
    secret_env.delenv("RECSYS_KAFKA__SASL_PASSWORD")
    secret_env.setenv("RECSYS_KAFKA__SASL_PASSWORD_FILE", str(secret_file))
    assert main(["config"]) == 0
    out, err = capsys.readouterr()
    _assert_clean(out, err)
    assert SASL_PASSWORD in settings_secrets(load_settings())


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """A root handler writing formatted records (tracebacks included) to a string."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    yield stream
    root.removeHandler(handler)
    # pytest's own capture handlers outlive this test: take the filter off them again.
    for h in root.handlers:
        for f in [f for f in h.filters if isinstance(f, SecretFilter)]:
            h.removeFilter(f)


def test_kafka_admin_debug_log_is_redacted(
    secret_env: pytest.MonkeyPatch,
    broker: str,
    caplog: pytest.LogCaptureFixture,
    log_stream: io.StringIO,
) -> None:
    secret_env.setenv("RECSYS_KAFKA__BOOTSTRAP_SERVERS", broker)
    secret_env.setenv("RECSYS_KAFKA__SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    secret_env.setenv("RECSYS_KAFKA__SASL_MECHANISM", "PLAIN")
    secret_env.setenv("RECSYS_KAFKA__SASL_USERNAME", "recsys")
    settings = load_settings()
    install_secret_filter(settings_secrets(settings))
    caplog.set_level(logging.DEBUG)
    # Another test (or a CLI entry point run in-process) may have raised these loggers' levels.
    caplog.set_level(logging.DEBUG, logger="kafka")
    caplog.set_level(logging.DEBUG, logger="recsys")
    # The embedded broker speaks PLAINTEXT only, so the SASL handshake fails and bootstrap
    # times out; kafka-python has logged its whole configuration by then.
    try:
        admin = make_admin(settings.kafka, bootstrap_timeout_ms=3000)
    except Exception:
        logging.getLogger("test").exception("admin client failed")
    else:  # a broker that does take SASL: the log line was written all the same
        admin.close()
    config_lines = [r for r in caplog.records if "KafkaAdminClient with configuration" in r.msg]
    assert config_lines, "kafka-python no longer logs its configuration: revisit this test"
    assert "'sasl_plain_password': '<hidden>'" in config_lines[-1].getMessage()
    assert "'sasl_plain_username': 'recsys'" in config_lines[-1].getMessage()
    _assert_clean(caplog.text, log_stream.getvalue())
    _assert_clean(*(r.getMessage() for r in caplog.records))


def test_filter_redacts_messages_arguments_and_tracebacks(
    caplog: pytest.LogCaptureFixture, log_stream: io.StringIO
) -> None:
    install_secret_filter([SASL_PASSWORD])
    install_secret_filter([PG_PASSWORD])  # a second call adds to the filter already there
    caplog.set_level(logging.DEBUG)
    # Another test (or a CLI entry point run in-process) may have raised these loggers' levels.
    caplog.set_level(logging.DEBUG, logger="kafka")
    caplog.set_level(logging.DEBUG, logger="recsys")
    log = logging.getLogger("recsys.test")
    log.info("connecting with %s", SASL_PASSWORD)
    log.info("store at %s", PG_URL)  # a known secret, and a URL password in any case
    log.info("other store at postgresql://bob:unknown-pw-3@db/x")  # not a known value
    log.info("env: RECSYS_KAFKA__SASL_PASSWORD=unknown-pw-4 password: 'unknown-pw-5'")
    log.info('{"db_password": "unknown-pw-6", "user": "bob"}')
    log.debug("raw request %r", b"\x00recsys\x00" + SASL_PASSWORD.encode())
    try:
        raise RuntimeError(f"auth failed for {PG_URL}")
    except RuntimeError:
        log.exception("store down")
    log.warning("no secret here: %d items, 50%% done", 3)
    text = caplog.text + log_stream.getvalue()
    _assert_clean(text)
    for n in range(3, 7):
        assert f"unknown-pw-{n}" not in text
    assert "postgresql://bob:<hidden>@db/x" in text
    assert '"user": "bob"' in text
    assert "Traceback" in log_stream.getvalue()  # the traceback is kept, redacted
    assert "no secret here: 3 items, 50% done" in text


def test_short_values_are_not_replaced_everywhere() -> None:
    # A two-letter "password" would otherwise turn every "pw" in every log line into <hidden>.
    f = SecretFilter(["pw", ""])
    assert f.redact("pwd is not a secret") == "pwd is not a secret"
    assert f.redact("password=pw") == "password=<hidden>"


def test_kafka_settings_password_never_in_repr() -> None:
    s = KafkaSettings(
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password=SASL_PASSWORD,
    )
    _assert_clean(repr(s), str(s), s.model_dump_json())
