"""Shared fixtures: the real embedded broker, real databases, and the packaged data sets."""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from recsys import datasets
from recsys.broker import EmbeddedBroker
from recsys.config import KafkaSettings
from recsys.testing.outage import moto_server

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every test's own torch work on one thread.

    The tensors here are tiny, and on a busy 2-core machine OpenMP's spin-waiting threads make
    a test that takes 6 s alone take minutes. Reset per test: code under test (the evaluators'
    ``threads`` option) may change it. Worker subprocesses keep their own setting.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder holding the packaged data sets, laid out as ``ml-latest-small/`` and
    ``obd/random/all/`` (the upstream layout), so tests join those names onto it."""
    return datasets.path("ml-latest-small").parent


@pytest.fixture(scope="session")
def broker() -> Iterator[str]:
    """A real Tansu broker on a free loopback port, for the whole session; yields bootstrap."""
    with EmbeddedBroker() as b:
        yield b.bootstrap


@pytest.fixture(scope="session")
def kafka_settings(broker: str) -> KafkaSettings:
    """Kafka settings for the session broker, with the short group timeouts tests need."""
    return KafkaSettings(
        bootstrap_servers=broker,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
        max_poll_interval_ms=10000,
    )


@pytest.fixture
def topic_prefix() -> str:
    """A unique prefix so tests sharing the session broker never share topics."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server (a moto_server subprocess on a free loopback port), for the
    whole session; yields its endpoint URL. Any access key is accepted."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(binary).is_file():
        pytest.fail("moto_server not found: pip install 'moto[server]' (the dev extra has it)")
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        yield endpoint


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The publisher's store URL: a SQLite file, then the session's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards.

    Uses RECSYS_TEST_POSTGRES_URL (an admin URL) or the local server. Skips locally when no
    server answers; in CI (CI=true) that is a failure, never a skip.
    """
    import sqlalchemy as sa

    admin_url = os.environ.get("RECSYS_TEST_POSTGRES_URL", DEFAULT_PG)
    try:
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL required in CI but unreachable at {admin_url}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {admin_url}: {exc}")
    name = f"recsys_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(admin_url).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "select pg_terminate_backend(pid) from pg_stat_activity where datname = :n"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()
