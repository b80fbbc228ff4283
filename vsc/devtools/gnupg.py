"""
GnuPG against the card's OpenPGP application, for the integration tests
(tests/test_gnupg.py) and the benchmark (bench/pcsc.py): a temporary
GNUPGHOME whose scdaemon uses pcscd (``disable-ccid``, ``pcsc-driver``) and
whose gpg-agent asks a scripted pinentry (the user PIN, the admin PIN and the
reset code from a JSON file, chosen by the prompt), and ``gpg --card-edit``
driven through ``--command-fd``/``--status-fd`` (each prompt keyword gets
its scripted answer).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time  # clock-ok: waits for scdaemon to see a card, against the monotonic clock
from pathlib import Path

LIBPCSC = next((p for p in ("/usr/lib/x86_64-linux-gnu/libpcsclite.so.1", "/usr/lib/aarch64-linux-gnu/libpcsclite.so.1",
                            "/usr/lib/libpcsclite.so.1") if os.path.exists(p)), None)
SCDAEMON = Path("/usr/lib/gnupg/scdaemon")
TIMEOUT = 120.0
ADMIN_PIN = "12345678"
RESET_CODE = "reset-code-1"
NAME, EMAIL = "Card Holder", "holder@example.org"

PINENTRY = '''#!{python}
"""A scripted pinentry: the Assuan dialogue, PINs from {pins}."""
import json, sys
print("OK scripted pinentry", flush=True)
desc = ""
for line in sys.stdin:
    cmd, _, arg = line.rstrip("\\n").partition(" ")
    cmd = cmd.upper()
    if cmd == "SETDESC":
        desc = arg.replace("%0A", " ")
    elif cmd == "GETPIN":
        pins = json.load(open({pins!r}))
        key = "admin" if "Admin" in desc else "reset" if "Reset" in desc else "pin"
        with open({log!r}, "a") as f:
            f.write(key + "\\n")
        print("D " + pins[key].replace("%", "%25"), flush=True)
    elif cmd == "BYE":
        print("OK", flush=True)
        break
    print("OK", flush=True)
'''


class GnuPG:
    """A temporary GNUPGHOME whose scdaemon talks to pcscd and whose pinentry is scripted."""

    def __init__(self, root: Path, pin: str):
        self.home = root / "gnupg"
        self.home.mkdir(mode=0o700)
        self.pins_file = root / "pins.json"
        self.pinentry_log = root / "pinentry.log"
        self.set_pins(pin=pin, admin=ADMIN_PIN, reset=RESET_CODE)
        pinentry = root / "pinentry.py"
        pinentry.write_text(PINENTRY.format(python=sys.executable, pins=str(self.pins_file),
                                            log=str(self.pinentry_log)))
        pinentry.chmod(0o755)
        (self.home / "scdaemon.conf").write_text(f"disable-ccid\npcsc-driver {LIBPCSC}\n"
                                                 f"log-file {root / 'scdaemon.log'}\n")
        (self.home / "gpg-agent.conf").write_text(f"pinentry-program {pinentry}\nenable-ssh-support\n"
                                                  f"log-file {root / 'gpg-agent.log'}\n")
        self.env = dict(os.environ, GNUPGHOME=str(self.home))
        self.env.pop("GPG_AGENT_INFO", None)

    def set_pins(self, **pins: str) -> None:
        self.pins_file.write_text(json.dumps(pins))

    def gpg(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(["gpg", "--batch", "--no-tty", *args], input=input, capture_output=True, text=True,
                              timeout=TIMEOUT, env=self.env, stdin=None if input is not None else subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def card_edit(self, answers: dict[str, list[str]], *options: str) -> str:
        """``gpg [options] --card-edit`` driven by ``answers`` (see ``command``)."""
        return self.command(answers, *options, "--card-edit")

    def command(self, answers: dict[str, list[str]], *args: str) -> str:
        """
        ``gpg --command-fd 0 --status-fd 1 ARGS``: every GET_LINE/GET_BOOL prompt gets the next scripted answer
        for its keyword; returns the status lines. A prompt without an answer left fails.
        """
        p = subprocess.Popen(["gpg", "--command-fd", "0", "--status-fd", "1", "--no-tty", *args],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             bufsize=1, env=self.env)
        lines, unanswered = [], None
        queues = {k: list(v) for k, v in answers.items()}
        try:
            for line in p.stdout:
                lines.append(line.rstrip())
                parts = line.split()
                if len(parts) >= 3 and parts[0] == "[GNUPG:]" and parts[1] in ("GET_LINE", "GET_BOOL", "GET_HIDDEN"):
                    queue = queues.get(parts[2])
                    if not queue:
                        unanswered = parts[2]
                        break
                    p.stdin.write(queue.pop(0) + "\n")
                    p.stdin.flush()
        finally:
            p.stdin.close()
            try:
                p.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        err = p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        if unanswered is not None:
            raise AssertionError(f"gpg {' '.join(args)} asked {unanswered!r} with no scripted answer:\n"
                                 + "\n".join(lines) + "\n" + err)
        return "\n".join(lines) + "\n" + err

    def card_status(self) -> str:
        return self.gpg("--card-status").stdout

    def wait_for_card(self, timeout: float = TIMEOUT) -> str:
        """
        ``gpg --card-status`` once scdaemon has seen a newly inserted card; its output. scdaemon notices a removal
        and a new card on its own ticker, after pcscd does: until then it answers "Card not present" (or "Card
        removed") although the reader holds the card. Any other failure, or the card still unseen after
        ``timeout`` seconds, raises.
        """
        deadline = time.monotonic() + timeout
        while True:
            proc = self.gpg("--card-status", check=False)
            if proc.returncode == 0:
                return proc.stdout
            if not re.search(r"Card not present|Card removed", proc.stderr) or time.monotonic() > deadline:
                raise AssertionError(f"gpg --card-status exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
            time.sleep(0.2)  # clock-ok

    def field(self, status: str, name: str) -> str:
        m = re.search(rf"^{re.escape(name)} ?\.*: ?(.*)$", status, re.M)
        assert m, f"no {name!r} in:\n{status}"
        return m.group(1).strip()

    def ssh_socket(self) -> str:
        return subprocess.run(["gpgconf", "--list-dirs", "agent-ssh-socket"], capture_output=True, text=True,
                              env=self.env, timeout=30, check=True).stdout.strip()

    def close(self) -> None:
        subprocess.run(["gpgconf", "--kill", "all"], env=self.env, capture_output=True, timeout=30)


def generate_card_keys(g: GnuPG, name: str = NAME, email: str = EMAIL) -> str:
    """``gpg --card-edit`` admin / generate (no off-card backup, no expiry): the fingerprint of the new key."""
    out = g.card_edit({"cardedit.prompt": ["admin", "generate", "quit"], "cardedit.genkeys.backup_enc": ["n"],
                       "cardedit.genkeys.replace_keys": ["y"], "keygen.valid": ["0"], "keygen.name": [name],
                       "keygen.email": [email], "keygen.comment": [""]})
    created = re.search(r"KEY_CREATED B ([0-9A-F]{40})", out)
    if not created:
        raise AssertionError(f"gpg --card-edit generate made no key:\n{out}")
    return created.group(1)


#: gpg 2.2's curve menu for card keys with --expert: 1 Curve 25519, 2 Curve 448, 3 NIST P-256, ...
CURVE_MENU = {"cv25519": "1", "nistp256": "3"}


def set_card_key_attributes(g: GnuPG, curve: str) -> str:
    """``gpg --expert --card-edit`` admin / key-attr: all three keys to ECC ``curve`` (admin PIN)."""
    choice = CURVE_MENU[curve]
    return g.card_edit({"cardedit.prompt": ["admin", "key-attr", "quit"], "cardedit.genkeys.algo": ["2"] * 3,
                        "keygen.curve": [choice] * 3}, "--expert")
