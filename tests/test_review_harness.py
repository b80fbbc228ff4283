"""
Rules of the server that the conformance harness (vsc conformance) let a
mutant break, found by an adversarial review of the harness: each is a
mutant in tools/mutate.py that survived the harness as it was (run against
it before the new item existed) and a conformance item that now kills it.
The mutants run for real here, each on the harness area that catches it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_mutate import TOOL, mutate
from vsc.conformance.items import SERVER_ITEMS

#: mutant -> the item (its § and name) that catches it; every one of these was "missed" before its item
REVIEW_MUTANTS = {
    "password-change-keeps-verifier": "password_change",
    "password-retry-other-verifier": "password_change",
    "idle-remove-retry-other-upload": "idle_remove_retry",
    "idle-remove-retry-any-version": "idle_remove_retry",
    "recover-keeps-session": "recover_forgets_session",
    "success-keeps-source-failures": "success_resets_source_bucket",
    "refused-operation-raises-limits": "refused_operation_keeps_limits",
    "hello-r1-fixed": "replayed_key_transport",
    "x25519-small-order-accepted": "small_order_x25519",
}
TIMEOUT = 900  # the whole run (a bound on a hung run, not a speed budget)


def _item(check: str):
    return next(i for i in SERVER_ITEMS if i.check.__name__ == check)


def test_each_review_mutant_is_listed_with_the_area_of_its_item():
    """Each mutant is in tools/mutate.py (a server mutant) and names, for --focus, the area of the item that kills it."""
    by_name = {m.name: m for m in mutate.MUTANTS}
    for name, check in REVIEW_MUTANTS.items():
        m = by_name[name]
        assert m.mode == "server" and m.rule.startswith("§"), name
        assert m.areas == (_item(check).area,), name


@pytest.mark.integration
def test_the_review_mutants_are_caught_by_their_items(tmp_path):
    """
    tools/mutate.py --only <the review's mutants> --focus: the unmutated
    server passes every item of their areas, and each mutant (a real server
    from a mutated scratch copy) fails the item written for it. Before those
    items every one of these mutants passed the whole harness.
    """
    out = tmp_path / "mutate.json"
    r = subprocess.run([sys.executable, str(TOOL), "--only", ",".join(REVIEW_MUTANTS), "--focus", "--jobs", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert out.exists(), r.stdout + r.stderr
    summary = json.loads(out.read_text())
    assert [b["result"] for b in summary["baseline"]] == ["missed"] and summary["baseline"][0]["items"] > 0
    results = {o["name"]: o for o in summary["results"]}
    assert set(results) == set(REVIEW_MUTANTS)
    for name, check in REVIEW_MUTANTS.items():
        item = _item(check)
        o = results[name]
        assert o["result"] == "caught", (name, o)
        assert any(c.startswith(f"{item.section} ") for c in o["caught_by"]), (name, o["caught_by"])
    assert r.returncode == 0, r.stderr
