"""
The mutation self-test of the conformance harness (tools/mutate.py, issue 14):
every mutation in its list still applies to the current tree (a snippet that
no longer matches is an error, so the list cannot rot silently), and a
bounded CI subset — a tag compared on half its bytes, a one-record replay
window, a repeated insert that no longer compares the machine, sync/remove
without the insert secret, a lockout threshold off by one — is run for real
(a mutated server from a scratch copy, the unmutated harness against it)
and each mutant must be caught. The full run's result is in
docs/integrator.md ("Mutation self-test").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "mutate.py"
CI_TIMEOUT = 900  # the whole subset (a bound on a hung run, not a speed budget)


def _tool():
    spec = importlib.util.spec_from_file_location("vsc_tools_mutate", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


mutate = _tool()


def test_every_mutation_snippet_applies_to_the_current_tree():
    """Each mutant's original snippet occurs exactly once in its file and the mutated file still compiles; at least 30 mutants, names unique, each naming the § it weakens."""
    assert mutate.check_all() == []
    assert len(mutate.MUTANTS) >= 30
    names = [m.name for m in mutate.MUTANTS]
    assert len(names) == len(set(names))
    for m in mutate.MUTANTS:
        assert m.rule.startswith("§"), m.name
        assert m.mode in ("server", "card"), m.name
        assert (ROOT / m.file).is_file() and m.file.startswith("vsc/"), m.name


def test_a_snippet_that_no_longer_matches_is_an_error(tmp_path):
    """A mutant whose snippet is missing (or occurs twice) is reported, never skipped: check_all names it and the script exits 2."""
    gone = mutate.Mutant("gone", "§8 R4: test", "vsc/protocol/channel.py", "this text is not in the file", "x")
    twice = mutate.Mutant("twice", "§8 R4: test", "vsc/protocol/channel.py", "self.", "self .")
    problems = mutate.check_all((gone, twice))
    assert len(problems) == 2
    assert "gone: the snippet occurs 0 times" in problems[0] and "twice: the snippet occurs" in problems[1]
    with pytest.raises(mutate.SnippetError):
        mutate.mutated_text(gone)


def test_the_scratch_copy_carries_exactly_the_one_mutation(tmp_path):
    """scratch_tree copies vsc/ and the twisted plugin and changes only the mutant's file, by exactly its snippet."""
    m = next(m for m in mutate.MUTANTS if m.name == "replay-window-one-record")
    mutate.scratch_tree(tmp_path / "tree", m)
    changed = [p.relative_to(tmp_path / "tree") for p in (tmp_path / "tree").rglob("*.py")
               if p.read_bytes() != (ROOT / p.relative_to(tmp_path / "tree")).read_bytes()]
    assert [str(p) for p in changed] == [m.file]
    text = (tmp_path / "tree" / m.file).read_text()
    assert m.replacement in text and m.original not in text
    assert (tmp_path / "tree" / "twisted" / "plugins").is_dir()
    assert (ROOT / m.file).read_text().count(m.original) == 1  # the working tree is untouched


def test_the_ci_subset_covers_mac_replay_machine_and_lockout():
    """The CI subset has 4-6 mutants and covers a tag check, the replay window, a machine check and the lockout."""
    ci = [m.name for m in mutate.MUTANTS if m.ci]
    assert 4 <= len(ci) <= 6
    assert all(m.areas for m in mutate.MUTANTS if m.ci)  # --focus runs only those areas of the harness
    assert any("tag" in n for n in ci) and any("replay" in n for n in ci)
    assert any("machine" in n for n in ci) and any("lockout" in n for n in ci)


def test_the_mutant_server_is_configured_as_the_conformance_test_runs_ours():
    """tools/mutate.py runs its servers with tests/test_conformance.py's settings and tells the harness the same values."""
    from tests.test_conformance import CONFORMANCE_SETTINGS

    assert mutate.SERVER_SETTINGS == {k: str(v) for k, v in CONFORMANCE_SETTINGS.items()}
    assert set(mutate.HARNESS_SETTINGS.values()) <= set(mutate.SERVER_SETTINGS)


@pytest.mark.integration
def test_the_ci_subset_of_mutants_is_caught(tmp_path):
    """tools/mutate.py --subset ci --focus: the unmutated baseline passes every item of the subset's areas, then each CI mutant (a real server from a mutated scratch copy) fails at least one item of its area."""
    out = tmp_path / "mutate.json"
    r = subprocess.run([sys.executable, str(TOOL), "--subset", "ci", "--focus", "--jobs", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=CI_TIMEOUT, cwd=tmp_path)
    assert out.exists(), r.stdout + r.stderr
    summary = json.loads(out.read_text())
    print("\n" + r.stdout)
    assert [b["result"] for b in summary["baseline"]] == ["missed"]  # the unmutated server passes every item
    assert summary["baseline"][0]["items"] > 0
    results = {o["name"]: o for o in summary["results"]}
    assert set(results) == {m.name for m in mutate.MUTANTS if m.ci}
    for name, o in results.items():
        assert o["result"] == "caught", (name, o)
        assert o["caught_by"] and all(c.startswith("§") for c in o["caught_by"]), (name, o)
    assert r.returncode == 0, r.stderr
