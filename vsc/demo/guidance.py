"""
What ``vsc demo`` prints for its user: paths and command lines as they would
be typed from the current directory, the server's view of the card, the
commands to try while the demo stays up, and the closing summary.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

SERIAL = "demo-card"
COUNTER = "demo-runs"
SLOT_TEXT = {"9a": "RSA-2048, PKCS#1 v1.5", "9c": "ECDSA P-256"}


def say(text: str = "") -> None:
    print(text, flush=True)


def shown(path: str | os.PathLike) -> str:
    """A path as the user would type it from the current directory."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def display(cmd: list[str]) -> str:
    """A command line for printing: programs by their short name, paths as typed from here."""
    out = [os.path.basename(cmd[0])]
    for arg in cmd[1:]:
        out.append(shown(arg) if os.path.isabs(arg) and os.path.exists(os.path.dirname(arg)) else arg)
    return shlex.join(out)


def last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def tail(path: Path, n: int = 5) -> str:
    """The last ``n`` non-blank lines of a log, indented under the step."""
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join("      | " + ln for ln in lines[-n:])


def highlights(info: dict) -> str:
    """The server's record of the card in one line (``vsc admin show --json``)."""
    parts = [f"state {info['state']}", f"version {info['version']}"]
    if info.get("muk"):
        parts.append(f"machine (MUK) {info['muk'][:16]}...")
    if info.get("protected_bytes") is not None:
        parts.append(f"{info['protected_bytes']} bytes of encrypted protected information")
    parts.append(f"{info.get('failures', 0)} failed authentications")
    return ", ".join(parts)


def introduce(root: Path) -> None:
    say("vsc demo: a VSC Server on SQLite and a Virtual Smart Card (EP 0 936 530), each its own process:")
    say("the card is enrolled, inserted, used to sign, then removed, over the protected channel of Figure 7.")
    say(f"Everything lives in {shown(root)}/ (delete it to start afresh).")


def try_next(demo, bindir: Path) -> None:
    """While the demo stays up: the commands to try from another terminal (``demo`` is a vsc.demo.steps.Demo)."""
    b = shown(bindir)
    vsc = shlex.quote(f"{b}/vsc")
    home = shlex.quote(shown(demo.home))
    data = shlex.quote(shown(demo.server_dir))
    pw = shlex.quote(shown(demo.password_file))
    lock = f"VSC_LOCK_DIR={shlex.quote(shown(demo.lock_dir))}"
    work = shown(demo.work)
    note_in = shlex.quote(f"{work}/note.txt")
    note_out = shlex.quote(f"{work}/note.out")
    mine = shlex.quote(f"{work}/mine.txt")
    mine_sig = shlex.quote(f"{work}/mine.sig")
    pem = shlex.quote(f"{work}/9c.pem")
    card = f"{vsc} card --home {home}"
    admin = f"{vsc} admin --data-dir {data}"
    say()
    say(f"The demo stays up: the VSC Server (pid {demo.server.pid}) listens on 127.0.0.1:{demo.server.port} and "
        f"card {SERIAL} is in use in its card process (pid {demo.card.pid}).")
    say("Try it from another terminal, in this directory:")
    rows = [
        ("the card's state", [f"{card} status"]),
        ("sign a file", [f"echo 'my text' > {mine}",
                         f"{card} sign --slot 9c --in {mine} --out {mine_sig}"]),
    ]
    if demo.openssl:
        rows.append(("verify it", [f"openssl dgst -sha256 -verify {pem} -signature {mine_sig} {mine}"]))
    rows += [
        ("step a counter", [f"{card} counter {COUNTER} --add 1"]),
        ("store a secret", [f"echo 's3cret' > {note_in}", f"{card} data put note --in {note_in}"]),
        ("read it back", [f"{card} data get note --out {note_out} && cat {note_out}"]),
        ("the server's view", [f"{admin} list", f"{admin} show {SERIAL}", f"{admin} history {SERIAL}"]),
        ("the channel", [f"{vsc} ping --server {demo.server.endpoint} --server-key {demo.fingerprint}"]),
        ("remove the card", [f"{card} remove   # uploads it, sets it idle, ends the card process"]),
        ("insert it again", [f"{lock} {shlex.quote(f'{b}/twistd')} -n --pidfile= vsc-card --home {home} "
                             f"--password-file {pw}"]),
        ("after a crash", [f"{lock} {card} recover --password-file {pw}   "
                           "# frees a card a killed card process left in use (this machine only)"]),
    ]
    agent = demo.ssh_agent_socket()
    if agent:
        rows.append(("ssh with the card", [f"{card} ssh-pubkey   # authorized_keys lines",
                                           f"SSH_AUTH_SOCK={shlex.quote(agent)} ssh-add -l"]))
    rows.append(("logs", [f"{shown(demo.server_log)}  {shown(demo.card_log)}"]))
    for label, lines in rows:
        for i, line in enumerate(lines):
            say(f"  {(label + ':') if i == 0 else '':<19} {line}")
    say("Press Ctrl-C to stop: the card is removed (uploaded and set idle), then the server stops.")


def card_process_ended(code: int, how: str) -> None:
    """The card process ended while the demo stays up: what that means and what to do."""
    say()
    if code == 0:
        say("(the card process exited: the card was removed, as 'vsc card remove' does; insert it again "
            "with the command above; Ctrl-C still stops the demo)")
    else:
        say(f"(the card process ended ({how}) without removing the card: the server still has it in use. "
            "Free it with the 'after a crash' command above, or press Ctrl-C: the demo recovers it)")


def farewell(elapsed: float, once: bool, up_after: float, signatures: int, bindir: Path) -> None:
    """The closing summary of a demo that got every step done."""
    took = f"in {elapsed:.1f} s" if once else f"(every step done {up_after:.1f} s after the start)"
    say(f"Demo finished {took}: card {SERIAL} enrolled or reused, inserted, {signatures} signatures "
        f"made and verified, a counter stepped, the card removed (idle), the server stopped.")
    if once:
        say(f"Run '{shlex.quote(shown(bindir) + '/vsc')} demo' (or './quickstart demo') without --once to keep it "
            "up and try the card yourself; './quickstart test' runs the test suite.")
    else:
        say("Run it again any time: the same card is inserted again. './quickstart test' runs the test suite.")
