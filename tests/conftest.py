"""Shared fixtures. pytest is the only runner; pytest-twisted supplies a real reactor where needed."""


# ---------------------------------------------------------------- databases (tests/pg.py)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def pg_cluster():
    """A private PostgreSQL cluster for the whole session (tests/pg.py); stopped and deleted at the end."""
    from tests.pg import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_url(pg_cluster):
    """postgresql://postgres@127.0.0.1:PORT/postgres of the session's private cluster."""
    return pg_cluster.url()


@pytest.fixture
def pg_database_url(pg_cluster):
    """A FRESH empty PostgreSQL database for this test, dropped afterwards."""
    with pg_cluster.fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """The same test on both backends: a SQLite file in tmp_path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'vsc.sqlite3'}"
    return request.getfixturevalue("pg_database_url")
