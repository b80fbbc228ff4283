"""
The first-run experience: ``vsc demo`` (what ``./quickstart demo`` ends in)
works end to end and cleans up after itself, and the README, ``quickstart``
and ``.ci/run`` agree on the two commands a new user types.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VSC = Path(sys.executable).parent / "vsc"  # the console script installed with this Python
DEMO_TIMEOUT = 60


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


@pytest.mark.integration
def test_demo_runs_end_to_end_and_leaves_no_server(tmp_path):
    """
    ``vsc demo`` creates a data dir, starts twistd vsc-server as a separate
    process, completes a pinned, sealed channel for each of the 3 modern suites
    with and without forward secrecy, sees a wrong pin refused, stops the server
    and exits 0 within 60 s, leaving no twistd process behind.
    """
    if not VSC.exists():
        pytest.fail(f"{VSC} is missing: vsc is not installed in this environment (run ./quickstart test)")
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs Linux /proc to look for leftover processes")
    demo_dir = tmp_path / "demo"
    env = {**os.environ, "VSC_DEMO_DIR": str(demo_dir)}
    env.pop("VSC_DEBUG", None)
    try:
        proc = subprocess.run(
            [str(VSC), "demo", "--key-bits", "2048"],
            env=env,
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=DEMO_TIMEOUT,
        )
    finally:
        leftovers = _processes_mentioning(str(demo_dir))
    out = proc.stdout
    assert proc.returncode == 0, f"vsc demo failed (exit {proc.returncode}):\n{out}\n{proc.stderr}"
    assert not leftovers, f"processes left behind: {leftovers}"

    fp = re.search(r"server key fingerprint \(cards pin this\): (SHA256:[A-Za-z0-9+/]{43})", out)
    assert fp, out
    assert re.search(r"server pid \d+ listening on 127\.0\.0\.1:\d+", out), out
    for suite in ("aes256-gcm", "chacha20-poly1305", "aes256-cbc-hmac-sha256"):
        rows = [ln for ln in out.splitlines() if ln.strip().startswith(suite + " ")]
        assert len(rows) == 2, f"expected a row with and one without forward secrecy for {suite}:\n{out}"
        assert any("X25519" in r for r in rows) and any("off" in r for r in rows), rows
        assert all("all echoed" in r for r in rows), rows
    assert f"every channel pinned the server key {fp.group(1)}" in out
    assert "SERVER_KEY_MISMATCH" in out and "refused" in out
    assert "server stopped" in out
    assert "6 protected channels established" in out
    assert "What to try next" in out
    assert (demo_dir / "vsc-server.ini").exists()
    assert (demo_dir / "server.log").read_text().strip(), "the server log is empty"
    assert not (tmp_path / "twistd.pid").exists(), "twistd wrote a pid file into the working directory"


@pytest.mark.integration
def test_demo_reuses_its_data_dir_and_keeps_the_fingerprint(tmp_path):
    """
    Running the demo twice on the same directory works (the quickstart is
    idempotent): the second run reuses the server key instead of failing on
    ``admin init``, so the pinned fingerprint stays the same.
    """
    demo_dir = tmp_path / "demo"
    env = {**os.environ, "VSC_DEMO_DIR": str(demo_dir)}
    fingerprints = []
    for _ in range(2):
        proc = subprocess.run(
            [str(VSC), "demo", "--key-bits", "2048", "--count", "1"],
            env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=DEMO_TIMEOUT,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        fingerprints.append(re.search(r"cards pin this\): (\S+)", proc.stdout).group(1))
    assert "reusing it" in proc.stdout
    assert fingerprints[0] == fingerprints[1]
    assert not _processes_mentioning(str(demo_dir))


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
