"""
The test session's private PostgreSQL cluster (vsc.devtools.pg, never the
system one). When something is missing, ``tests.integration.missing`` skips
locally and fails under VSC_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

from vsc.devtools.pg import Cluster, unavailable

from tests.integration import missing


def start_cluster() -> Cluster:
    """Start a cluster (``url``, ``fresh_database``, ``stop``), or call ``missing`` (skip locally, fail in CI)."""
    why = unavailable()
    if why:
        missing(why)
    return Cluster().start()
