"""
The `vsc conformance` harness run against our own server and card, as CI
does: every check of docs/protocol.md must pass, and the harness must fail
(exit non-zero) against an implementation that breaks the protocol.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from vsc.conformance import CARD_ITEMS, SERVER_ITEMS

from tests.servers import VSC, _env, init_data_dir, servers  # noqa: F401  (fixture)

HARNESS_TIMEOUT = 240


def run_harness(*args: str, timeout: float = HARNESS_TIMEOUT) -> tuple[int, list[dict], str]:
    r = subprocess.run([str(VSC), "conformance", "--json", *args], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    results = json.loads(r.stdout) if r.stdout.strip().startswith("[") else []
    return r.returncode, results, r.stderr


def test_server_conformance_with_the_default_30_second_deadline(tmp_path, servers):  # noqa: F811
    """Every server-mode check passes against our server, including an implementation-auth answer later than 30 s."""
    data = tmp_path / "srv"
    info = init_data_dir(data)
    server = servers.start(data)
    code, results, err = run_harness("--server", server.endpoint, "--server-key", info["fingerprint"],
                                     "--admin-data-dir", str(data))
    failed = [r for r in results if not r["ok"]]
    assert code == 0 and not failed, (failed, err)
    names = {r["name"] for r in results}
    assert len(results) >= 30
    assert any("later than 30 s" in n for n in names)
    for area in ("handshake", "record", "life cycle", "refusal"):
        assert any(r["area"] == area for r in results), area
    assert len(results) == len(SERVER_ITEMS)
    assert all(r["section"].startswith("§") and r["rules"] for r in results)


def test_card_conformance_against_our_card(tmp_path):
    """In card mode the harness plays a correct server and the hostile ones; our card succeeds only against the first."""
    code, results, err = run_harness("--card", timeout=120)
    assert code == 0, (results, err)
    assert [r["ok"] for r in results] == [True] * len(CARD_ITEMS)
    assert results[0]["name"].startswith("correct")


def test_harness_fails_against_a_broken_card(tmp_path):
    """A 'card' that accepts anything (always exits 0) fails the hostile scenarios: the harness exits non-zero."""
    code, results, _ = run_harness("--card", "--card-command", "true", timeout=120)
    assert code != 0
    assert results[0]["ok"] is True  # against the correct server, succeeding is right
    assert not any(r["ok"] for r in results[1:])


def test_harness_needs_a_target():
    """Without --server/--server-key or --card the harness says so in one line and exits non-zero."""
    r = subprocess.run([str(VSC), "conformance"], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode != 0
    assert "needs --server" in r.stderr and "Traceback" not in r.stderr


PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_every_item_names_a_section_and_rules_of_the_spec():
    """Each harness item (server and card mode) names a § heading of docs/protocol.md and §12 checklist identifiers that exist."""
    text = PROTOCOL_MD.read_text()
    sections = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", text, re.M))
    rules = set(re.findall(r"^- \[ \] ([A-Z]\d+) ", text, re.M))
    assert "10.6.1" in sections and "3" in sections and "S1" in rules  # the patterns do read the spec
    items = list(SERVER_ITEMS) + list(CARD_ITEMS)
    for item in items:
        assert item.section[1:] in sections, (item.name, item.section)
        assert item.rules and set(item.rules) <= rules, (item.name, item.rules)
    names = [i.name for i in items]
    assert len(names) == len(set(names))


def test_a_card_item_without_a_misbehaving_server_is_refused():
    """A card-mode item whose scenario the harness's server cannot play fails loudly instead of passing as 'correct'."""
    import pytest

    from vsc.conformance.card import MISBEHAVIOURS, _misbehaving

    assert {i.scenario for i in CARD_ITEMS} - {"correct"} <= set(MISBEHAVIOURS)
    with pytest.raises(ValueError, match="no server that misbehaves as 'rolls-back'"):
        _misbehaving("rolls-back", key=None)
