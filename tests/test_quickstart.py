"""
The first-run experience: ``vsc demo`` (what ``./quickstart demo`` ends in)
works end to end and cleans up after itself, and the README, ``quickstart``
and ``.ci/run`` agree on the two commands a new user types.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VSC = Path(sys.executable).parent / "vsc"  # the console script installed with this Python
DEMO_TIMEOUT = 90


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose argv mentions ``text`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def _demo_env(demo_dir: Path) -> dict:
    env = {**os.environ, "VSC_DEMO_DIR": str(demo_dir)}
    for name in ("VSC_DEBUG", "VSC_HOME", "VSC_LOCK_DIR"):
        env.pop(name, None)
    return env


def _require_demo_prerequisites() -> None:
    if not VSC.exists():
        pytest.fail(f"{VSC} is missing: vsc is not installed in this environment (run ./quickstart test)")
    if not Path("/proc/self/cmdline").exists():
        from tests.integration import missing

        missing("needs Linux /proc to look for leftover processes")


def _run_demo_once(demo_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``vsc demo --once`` in ``demo_dir``; fails the test if it leaves a process behind."""
    try:
        proc = subprocess.run(
            [str(VSC), "demo", "--once", "--key-bits", "2048"],
            env=_demo_env(demo_dir), cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=DEMO_TIMEOUT,
        )
    finally:
        leftovers = _wait_for_no_processes(str(demo_dir))
    assert not leftovers, f"processes left behind: {leftovers}"
    return proc


def _wait_for_no_processes(text: str, timeout: float = 10.0) -> list[str]:
    """Wait (bounded) until no live process mentions ``text``; returns the ones still there."""
    deadline = time.monotonic() + timeout  # clock-ok
    while True:
        found = _processes_mentioning(text)
        if not found or time.monotonic() > deadline:  # clock-ok
            return found
        time.sleep(0.1)  # clock-ok: polling /proc from a test


def _start_demo_staying_up(demo_dir: Path, cwd: Path) -> tuple[subprocess.Popen, Path]:
    """``vsc demo`` (no --once) with its output in a file; returns once it says it stays up."""
    out_path = cwd / f"demo-{len(list(cwd.glob('demo-*.out')))}.out"
    out = open(out_path, "w")
    proc = subprocess.Popen(
        [str(VSC), "demo", "--key-bits", "2048"],
        env=_demo_env(demo_dir), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        text=True,
    )
    out.close()
    deadline = time.monotonic() + DEMO_TIMEOUT  # clock-ok
    while "Press Ctrl-C to stop" not in out_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:  # clock-ok
            proc.kill()
            proc.wait(timeout=10)
            pytest.fail(f"vsc demo did not come up (exit {proc.returncode}):\n{out_path.read_text()}")
        time.sleep(0.1)  # clock-ok: waiting for a child's output in a test
    return proc, out_path


def _assert_card_life(out: str) -> None:
    """The lines every successful demo prints: inserted, two signatures verified, removed, final state idle."""
    assert re.search(r"server key fingerprint \(cards pin this\): SHA256:[A-Za-z0-9+/]{43}", out), out
    assert re.search(r"server pid \d+ listening on 127\.0\.0\.1:\d+", out), out
    assert re.search(r"card demo-card is in-use after [\d.]+ s: card process pid \d+", out), out
    for slot in ("9a", "9c"):
        assert re.search(rf"slot {slot} \(.*\): \d+-byte signature verified", out), out
    assert re.search(r"demo-runs = \d+", out), out
    assert re.search(r"^   state in-use, version \d+", out, re.M), out
    assert "card demo-card removed" in out or "recovering it" in out, out
    assert re.search(r"^   state idle, version \d+", out, re.M), out
    assert "server stopped" in out, out


@pytest.mark.integration
def test_demo_once_enrols_inserts_signs_removes_and_reruns_in_the_same_dir(tmp_path):
    """
    ``vsc demo --once`` on a fresh directory inits a SQLite server, starts it,
    enrols demo-card with a one-time code, inserts it in its own card process,
    signs with slots 9a and 9c and verifies both signatures, steps a counter,
    removes the card (state idle) and stops everything, exiting 0 with no
    process left. A second run in the same directory reuses the server key and
    the enrolled card (no new enrolment) and also succeeds; the counter the
    card keeps has moved on.
    """
    _require_demo_prerequisites()
    demo_dir = tmp_path / "demo"
    first = _run_demo_once(demo_dir, tmp_path)
    out = first.stdout
    assert first.returncode == 0, f"vsc demo --once failed (exit {first.returncode}):\n{out}\n{first.stderr}"
    _assert_card_life(out)
    assert "card demo-card enrolled in" in out, out
    assert "demo-runs = 1" in out, out
    assert (demo_dir / "server" / "vsc-server.ini").exists()
    assert (demo_dir / "server" / "vsc.sqlite3").exists(), "the demo server does not use the SQLite default"
    assert (demo_dir / "card-password").stat().st_mode & 0o777 == 0o600
    assert (demo_dir / "server.log").read_text().strip(), "the server log is empty"
    assert (demo_dir / "card.log").read_text().strip(), "the card log is empty"
    assert not (tmp_path / "twistd.pid").exists(), "twistd wrote a pid file into the working directory"
    fp1 = re.search(r"cards pin this\): (\S+)", out).group(1)

    second = _run_demo_once(demo_dir, tmp_path)
    out = second.stdout
    assert second.returncode == 0, f"the rerun failed (exit {second.returncode}):\n{out}\n{second.stderr}"
    _assert_card_life(out)
    assert "already enrolled" in out and "enrolled in" not in out, out
    assert "demo-runs = 2" in out, out
    assert re.search(r"cards pin this\): (\S+)", out).group(1) == fp1


@pytest.mark.integration
def test_demo_stays_up_until_sigint_then_removes_the_card(tmp_path):
    """
    Without --once the demo stays up after the card is in use and prints the
    commands to try (with this demo's --home, --data-dir and port); the card
    answers ``vsc card status`` meanwhile. SIGINT (Ctrl-C) makes it remove the
    card through its card process, stop the server, print the final state
    idle and exit 0, leaving no process behind.
    """
    _require_demo_prerequisites()
    demo_dir = tmp_path / "demo"
    proc, out_path = _start_demo_staying_up(demo_dir, tmp_path)
    try:
        up = out_path.read_text()
        for expected in ("card --home demo/card status", "counter demo-runs --add 1", "data put note",
                         "data get note", "card --home demo/card remove", "recover --password-file",
                         "admin --data-dir demo/server list", "show demo-card", "history demo-card", "vsc ping"):
            assert expected in up, f"{expected!r} missing from the suggestions:\n{up}"
        port = re.search(r"listens on 127\.0\.0\.1:(\d+)", up).group(1)
        assert f"--server tcp:127.0.0.1:{port} " in up, up
        status = subprocess.run(
            [str(VSC), "card", "--home", str(demo_dir / "card"), "status", "--json"],
            env=_demo_env(demo_dir), capture_output=True, text=True, timeout=30,
        )
        assert status.returncode == 0, status.stderr
        assert '"state": "in-use"' in status.stdout, status.stdout
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        leftovers = _wait_for_no_processes(str(demo_dir))
    out = out_path.read_text()
    assert code == 0, f"vsc demo exited {code} after SIGINT:\n{out}"
    assert not leftovers, f"processes left behind: {leftovers}"
    _assert_card_life(out)
    assert "SIGINT received: stopping" in out, out
    assert "card demo-card removed" in out, out


@pytest.mark.integration
def test_demo_killed_leaves_nothing_running_and_the_rerun_recovers_the_card(tmp_path):
    """
    SIGKILL the demo's card process and then the demo itself (no cleanup can
    run): its server still goes away (it dies with its parent), and the card
    stays in use on the server. The next ``vsc demo --once`` in the same
    directory sees that, recovers the card with ``vsc card recover`` (same
    machine), inserts it again and succeeds.
    """
    _require_demo_prerequisites()
    demo_dir = tmp_path / "demo"
    proc, out_path = _start_demo_staying_up(demo_dir, tmp_path)
    try:
        card_pid = int(re.search(r"in its card process \(pid (\d+)\)", out_path.read_text()).group(1))
        os.kill(card_pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        leftovers = _wait_for_no_processes(str(demo_dir))
    assert not leftovers, f"processes left behind after SIGKILL of the demo: {leftovers}"

    rerun = _run_demo_once(demo_dir, tmp_path)
    out = rerun.stdout
    assert rerun.returncode == 0, f"the rerun failed (exit {rerun.returncode}):\n{out}\n{rerun.stderr}"
    assert "recover" in out and "card demo-card is idle again" in out, out
    _assert_card_life(out)


def test_ci_runs_the_readme_test_command_with_integration_required():
    """
    .ci/run is a strict bash script that requires integration services
    (VSC_REQUIRE_INTEGRATION=1) and runs exactly ``./quickstart test``, the
    command the README gives.
    """
    text = (ROOT / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in lines
    assert "export VSC_REQUIRE_INTEGRATION=1" in lines
    assert lines[-1] == "./quickstart test"
    assert os.access(ROOT / ".ci" / "run", os.X_OK)


def test_readme_quickstart_is_exactly_two_commands():
    """
    The README's Quickstart section shows exactly two commands,
    ``./quickstart demo`` and ``./quickstart test``, and the script exists,
    is executable, and turns pytest's "no tests collected" (5) into failure.
    """
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^## Quickstart\n(.*?)(?=^## )", readme, re.S | re.M)
    assert m, "README.md has no '## Quickstart' section followed by another section"
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", m.group(1), re.S | re.M)
    commands = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip()]
    assert commands == ["./quickstart demo", "./quickstart test"]

    script = ROOT / "quickstart"
    assert os.access(script, os.X_OK)
    body = script.read_text()
    assert 'exec "$VENV/bin/vsc" demo "$@"' in body
    assert "editable_mode=compat" in body
    assert "-p no:cacheprovider" in body
    assert re.search(r'if \[ "\$rc" -eq 5 \]', body)


def test_quickstart_script_is_valid_bash():
    """``bash -n quickstart`` and ``bash -n .ci/run`` accept both scripts (no syntax errors)."""
    for name in ("quickstart", ".ci/run"):
        proc = subprocess.run(["bash", "-n", str(ROOT / name)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
