"""
The steps a user of ``vsc demo`` sees, in order (``Demo``): the server's
data directory, the server, the demo card enrolled or reused, inserted,
used to sign (verified with openssl), a counter stepped, the server's view,
optionally every channel suite, then staying up and the shutdown that
removes the card and stops the server. The programs it runs are in
vsc.demo.processes, what it prints in vsc.demo.guidance.

One responsibility (and so one module despite its length): the demo's walkthrough, step by step.

This is a command-line program, not library code: it polls its children and
reads the wall clock for its messages (each marked ``# clock-ok``).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import signal
import subprocess
import time  # clock-ok: a command-line walk-through times its steps and waits for Ctrl-C
from pathlib import Path

from vsc import cli, crypto
from vsc.demo import processes
from vsc.demo.guidance import (
    COUNTER,
    SERIAL,
    SLOT_TEXT,
    card_process_ended,
    display,
    highlights,
    last_line,
    say,
    shown,
    tail,
)
from vsc.demo.processes import (
    CARD_STOP_TIMEOUT,
    INSERT_TIMEOUT,
    STOP_TIMEOUT,
    ServerProcess,
    card_process,
    find_program,
    parse_json,
)
from vsc.devtools.process import Child, ProcessFailed, exit_text, free_port, port_is_free

DEFAULT_DIR = "vsc-demo"
DEFAULT_PORT = 7390
FORWARD_SECRECY_MODES = ("off", "require")


def clock() -> float:
    return time.monotonic()  # clock-ok: timing a CLI walk-through


def wrong_fingerprint() -> str:
    """A well-formed pin of a key that is not the server's."""
    return crypto.fingerprint(b"not the server key " + crypto.system_random(16))


class Demo:
    """The walk-through's state: paths, programs, children, and the steps."""

    def __init__(self, args):
        raw = args.dir or os.environ.get("VSC_DEMO_DIR") or DEFAULT_DIR
        self.args = args
        self.root = Path(raw).expanduser().absolute()
        self.server_dir = self.root / "server"
        self.home = self.root / "card"
        self.password_file = self.root / "card-password"
        self.lock_dir = self.root / "lock"
        self.work = self.root / "work"
        self.server_log = self.root / "server.log"
        self.card_log = self.root / "card.log"
        self.vsc = find_program("vsc")
        self.twistd = find_program("twistd")
        self.openssl = shutil.which("openssl")
        self.card_env = {**os.environ, "VSC_LOCK_DIR": str(self.lock_dir)}
        self.card_env.pop("VSC_HOME", None)
        self.server: ServerProcess | None = None
        self.card: Child | None = None
        self.fingerprint = ""
        self.step = 0
        self.up = False
        self.up_after = 0.0
        self.signatures = 0

    # ------------------------------------------------------------ small pieces

    def heading(self, text: str) -> None:
        self.step += 1
        say()
        say(f"{self.step}. {text}")

    def run(self, cmd: list[str], what: str, check: bool = True, show: bool = True,
            env: dict | None = None, redirect: Path | None = None) -> subprocess.CompletedProcess:
        if show:
            say(f"   $ {display(cmd)}" + (f" > {shlex.quote(shown(redirect))}" if redirect else ""))
        return processes.run(cmd, what, check=check, env=env, cwd=self.root)

    def card_cmd(self, *action: str) -> list[str]:
        return [self.vsc, "card", "--home", str(self.home), *action]

    def admin_cmd(self, *action: str) -> list[str]:
        return [self.vsc, "admin", "--data-dir", str(self.server_dir), *action]

    def show_card(self, show: bool = True) -> dict | None:
        """``vsc admin show demo-card --json``; None when the server has no such card."""
        proc = self.run(self.admin_cmd("show", SERIAL, "--json"), "vsc admin show", check=False, show=show)
        if proc.returncode != 0:
            if f"no card {SERIAL}" in proc.stderr:
                return None
            raise cli.CommandError(f"vsc admin show failed (exit {proc.returncode}): {last_line(proc.stderr)}")
        return parse_json(proc, "vsc admin show")

    def card_daemon_answers(self) -> dict | None:
        """The status of a card process serving the demo card's home, if one answers."""
        from vsc.card.config import control_socket_for

        if not control_socket_for(self.home).exists():
            return None
        proc = processes.run(self.card_cmd("status", "--json"), "vsc card status", check=False, env=self.card_env)
        if proc.returncode != 0:
            return None
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return None

    def card_settings(self):
        """The demo card's settings (card.ini), or None when it has none."""
        from vsc.card import config as cc

        if not (self.home / cc.CARD_INI).exists():
            return None
        try:
            return cc.load(self.home)
        except cc.CardConfigError:
            return None

    # ------------------------------------------------------------ 1. server data directory

    def prepare_server_dir(self) -> None:
        self.heading(f"Server data directory {shown(self.server_dir)} (database: embedded SQLite in that directory)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        if (self.server_dir / "vsc-server.ini").exists() and (self.server_dir / "server-key.pem").exists():
            info = parse_json(self.run(self.admin_cmd("fingerprint", "--json"), "vsc admin fingerprint"),
                              "vsc admin fingerprint")
            say("   it already exists: reusing it (same server key, same database, same cards)")
        else:
            t0 = clock()
            info = parse_json(self.run(self.admin_cmd("init", "--key-bits", str(self.args.key_bits), "--json"),
                                       "vsc admin init"), "vsc admin init")
            say(f"   created it with a new RSA-{self.args.key_bits} server key in {clock() - t0:.1f} s")
            say(f"   database: {info.get('database')}")
        self.fingerprint = info["fingerprint"]
        say(f"   server key fingerprint (cards pin this): {self.fingerprint}")

    # ------------------------------------------------------------ 2. server

    def preferred_port(self) -> tuple[int, bool]:
        """(port, whether the user chose it): --port, else the port the demo card knows, else 7390."""
        if self.args.port is not None:
            return self.args.port, True
        cfg = self.card_settings()
        if cfg is not None and cfg.server.startswith("tcp:127.0.0.1:"):
            try:
                return int(cfg.server.rsplit(":", 1)[1]), False
            except ValueError:
                pass
        return DEFAULT_PORT, False

    def start_server(self) -> None:
        self.heading("Starting the VSC Server as a separate process")
        port, chosen = self.preferred_port()
        if not chosen and not port_is_free(port):
            free = free_port()
            say(f"   port {port} is taken; using free port {free} instead")
            port = free
        for attempt in (1, 2):
            server = ServerProcess(self.twistd, self.server_dir, port, self.server_log, self.root)
            say(f"   $ {display(server.command())}")
            self.server = server
            server.spawn()
            try:
                took = server.wait_ready()
            except cli.CommandError:
                server.stop()
                if attempt == 1 and not chosen and server.startup_failed_on_port():
                    port = free_port()
                    say(f"   that port was taken meanwhile; retrying on free port {port}")
                    continue
                raise
            say(f"   server pid {server.pid} listening on 127.0.0.1:{port} after {took:.1f} s; "
                f"log: {shown(self.server_log)}")
            return

    # ------------------------------------------------------------ 3. enrol, or reuse the card

    def password(self) -> None:
        if self.password_file.exists():
            return
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(base64.urlsafe_b64encode(crypto.system_random(24)).decode("ascii") + "\n")

    def enrol_or_reuse(self) -> None:
        assert self.server is not None
        self.heading(f"The demo card {SERIAL!r}")
        info = self.show_card()
        cfg = self.card_settings()
        usable = cfg is not None and cfg.serial == SERIAL and cfg.server_key == self.fingerprint \
            and self.password_file.exists()
        if info is not None and info["state"] != "issued":
            if not usable:
                raise cli.CommandError(
                    f"the server already has a card {SERIAL} ({info['state']}) but {shown(self.home)} cannot use it "
                    f"(its settings or {shown(self.password_file)} are missing): "
                    f"delete {shown(self.root)} to start the demo afresh"
                )
            self.reuse(info, cfg)
            return
        if info is None:
            say(f"   the server has no card {SERIAL} yet: enrol one")
        else:
            say(f"   {SERIAL} was issued but never enrolled: issue a fresh code and enrol it")
        self.enrol(force=cfg is not None)

    def enrol(self, force: bool) -> None:
        assert self.server is not None
        issued = parse_json(self.run(self.admin_cmd("issue", SERIAL, "--json"), "vsc admin issue"), "vsc admin issue")
        say(f"   one-time enrolment code {issued['code']} (what the administrator hands the card's owner)")
        self.password()
        say(f"   the owner's password: a random one in {shown(self.password_file)} (mode 0600)")
        cmd = self.card_cmd("enroll", "--server", self.server.endpoint, "--server-key", self.fingerprint,
                            "--serial", SERIAL, "--code", issued["code"], "--password-file", str(self.password_file),
                            "--pin-policy", "9c=once", "--json")  # the demo signs with 9C without a PIN
        if force:
            cmd.insert(-1, "--force")
        t0 = clock()
        result = parse_json(self.run(cmd, "vsc card enroll", env=self.card_env), "vsc card enroll")
        slots = ", ".join(f"{s} {k}" for s, k in sorted(result.get("slots", {}).items()))
        say(f"   card {SERIAL} enrolled in {clock() - t0:.1f} s: keys made on this machine ({slots}), "
            f"sealed under a key derived from the password ({result.get('kdf')}), uploaded; "
            f"the server never sees the password")

    def reuse(self, info: dict, cfg) -> None:
        assert self.server is not None
        from vsc.card import config as cc

        say(f"   already enrolled (server state {info['state']}, version {info['version']}): "
            "reusing it (enrolling again would need a new code)")
        if cfg.server != self.server.endpoint:
            cc.save(self.home, **{**cfg.settings, "server": self.server.endpoint})
            say(f"   the server listens on a new port: {shown(self.home / cc.CARD_INI)} now says "
                f"server = {self.server.endpoint}")
        if info.get("locked_out"):
            raise cli.CommandError(
                f"card {SERIAL} is locked out after {info.get('failures')} failed authentications; clear it with: "
                f"{display(self.admin_cmd('unlock', SERIAL))}"
            )
        if info["state"] == "destroyed":
            raise cli.CommandError(
                f"card {SERIAL} has been destroyed, which is final; delete {shown(self.root)} to start the demo afresh"
            )
        if info["state"] == "in-use":
            status = self.card_daemon_answers()
            if status is not None and status.get("state") == "in-use":
                say("   it is still in use by a card process from earlier: remove it through that process")
                self.run(self.card_cmd("remove", "--json"), "vsc card remove", env=self.card_env)
            else:
                say("   the server still has it in use, but no card process serves it (an earlier demo was killed):")
                say("   recover it; only this machine, where it was last inserted, may")
                self.recover()
            after = self.show_card(show=False)
            if after is None or after["state"] != "idle":
                raise cli.CommandError(f"card {SERIAL} is still {after and after['state']}; "
                                       f"see {shown(self.server_log)}")
            say(f"   card {SERIAL} is idle again (version {after['version']})")

    def recover(self) -> None:
        t0 = clock()
        self.run(self.card_cmd("recover", "--password-file", str(self.password_file), "--json"),
                 "vsc card recover", env=self.card_env)
        say(f"   recovered in {clock() - t0:.1f} s")

    # ------------------------------------------------------------ 4. insert

    def insert(self) -> None:
        self.heading("Inserting the card: the card process downloads and decrypts it, then serves it")
        self.lock_dir.mkdir(exist_ok=True)
        cmd = [self.twistd, "-n", "--pidfile=", "vsc-card", "--home", str(self.home),
               "--password-file", str(self.password_file)]
        say(f"   $ VSC_LOCK_DIR={shlex.quote(shown(self.lock_dir))} {display(cmd)}")
        t0 = clock()
        self.card = card_process(cmd, self.card_log, self.root, self.card_env)
        status_cmd = self.card_cmd("status", "--json")
        say(f"   $ {display(status_cmd)}   (repeated until it says in-use)")
        status = self.wait_in_use(t0)
        say(f"   card {status['serial']} is {status['state']} after {clock() - t0:.1f} s: card process pid "
            f"{self.card.pid}, version {status['version']}, channel suite {status.get('suite')}; "
            f"log: {shown(self.card_log)}")
        slots = ", ".join(f"{k} {v['algorithm']}" for k, v in sorted(status.get("slots", {}).items()))
        say(f"   slots: {slots}")

    def wait_in_use(self, t0: float) -> dict:
        from vsc.card.config import control_socket_for

        assert self.card is not None
        sock = control_socket_for(self.home)
        last = [""]

        def in_use() -> dict | None:
            if not sock.exists():
                return None
            proc = processes.run(self.card_cmd("status", "--json"), "vsc card status", check=False, env=self.card_env)
            if proc.returncode != 0:
                last[0] = last_line(proc.stderr)
                return None
            status = parse_json(proc, "vsc card status")
            if status.get("state") == "in-use":
                return status
            last[0] = f"state {status.get('state')}"
            return None

        try:
            return self.card.wait_until(in_use, INSERT_TIMEOUT - (clock() - t0), "the card was in use", interval=0.1)
        except ProcessFailed:
            if self.card.returncode is not None:
                raise cli.CommandError(
                    f"the card process exited with code {self.card.returncode} before the card was in use; "
                    f"see {shown(self.card_log)}\n{tail(self.card_log)}"
                ) from None
            raise cli.CommandError(
                f"the card was not in use within {INSERT_TIMEOUT:.0f} s ({last[0] or 'no control socket yet'}); "
                f"see {shown(self.card_log)} and {shown(self.server_log)}"
            ) from None

    # ------------------------------------------------------------ 5. sign and verify

    def sign_and_verify(self) -> None:
        how = "openssl" if self.openssl else "vsc.crypto (openssl is not installed)"
        self.heading(f"Signing a message with the card and verifying the signatures with {how}")
        message = self.work / "message.txt"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")  # clock-ok: a timestamp in the demo's message
        text = f"signed by the Virtual Smart Card {SERIAL} at {stamp}\n"
        message.write_text(text)
        say(f"   message: {shown(message)} ({text.strip()!r})")
        tampered = self.work / "message-changed.txt"
        tampered.write_text(text.replace("signed", "forged"))
        for slot in ("9a", "9c"):
            pem_path = self.work / f"{slot}.pem"
            sig_path = self.work / f"message.{slot}.sig"
            pem = self.run(self.card_cmd("public-key", "--slot", slot), "vsc card public-key",
                           redirect=pem_path).stdout.strip() + "\n"
            if "BEGIN PUBLIC KEY" not in pem:
                raise cli.CommandError(f"vsc card public-key printed no PEM public key: {last_line(pem)}")
            pem_path.write_text(pem)
            self.run(self.card_cmd("sign", "--slot", slot, "--in", str(message), "--out", str(sig_path)),
                     "vsc card sign")
            size = sig_path.stat().st_size
            if self.openssl:
                verify = [self.openssl, "dgst", "-sha256", "-verify", str(pem_path), "-signature", str(sig_path)]
                proc = self.run(verify + [str(message)], "openssl dgst -verify", check=False)
                ok = proc.returncode == 0 and "Verified OK" in proc.stdout
                said = last_line(proc.stdout + proc.stderr)
                forged = processes.run(verify + [str(tampered)], "openssl dgst -verify", check=False, cwd=self.root)
                refused = forged.returncode != 0
            else:
                from vsc import crypto

                der = crypto.public_der_from_pem(pem.encode())
                ok = crypto.verify_sha256(der, message.read_bytes(), sig_path.read_bytes())
                said = "valid" if ok else "INVALID"
                refused = not crypto.verify_sha256(der, tampered.read_bytes(), sig_path.read_bytes())
            if not ok:
                raise cli.CommandError(f"the slot {slot} signature did not verify: {said}")
            if not refused:
                raise cli.CommandError(f"the slot {slot} signature also verified over a changed message")
            say(f"   slot {slot} ({SLOT_TEXT[slot]}): {size}-byte signature verified ({said}); "
                "over a changed message it fails, as it must")
            self.signatures += 1

    # ------------------------------------------------------------ 6. counter

    def step_counter(self) -> None:
        self.heading("Stepping a counter on the card (stored on the server before it is acknowledged)")
        value = parse_json(self.run(self.card_cmd("counter", COUNTER, "--add", "1", "--json"), "vsc card counter"),
                           "vsc card counter")["value"]
        note = "" if value == 1 else " (the card kept it across remove and insert)"
        say(f"   {COUNTER} = {value}{note}")

    # ------------------------------------------------------------ 7. the server's view

    def server_view(self) -> None:
        self.heading("What the server knows about the card (never its protected information)")
        info = self.show_card()
        if info is None or info["state"] != "in-use":
            raise cli.CommandError(f"the server says the card is {info and info['state']}, not in-use")
        say("   " + highlights(info))

    # ------------------------------------------------------------ 8. channels (optional)

    def channels(self) -> None:
        from vsc.protocol.suites import DEFAULT_SUITES

        assert self.server is not None
        self.heading("The protected channel with every modern suite, with and without forward secrecy")
        count = self.args.count
        template = [self.vsc, "ping", "--server", self.server.endpoint, "--server-key", self.fingerprint,
                    "--suites", "SUITE", "--forward-secrecy", "off|require", "--count", str(count), "--json"]
        say(f"   $ {display(template)}")
        say(f"   {'suite':<24} {'forward secrecy':<23} {'handshake':>10}  {'sealed echo records':<22} "
            f"{'median rtt':>10}")
        for suite in DEFAULT_SUITES:
            for fs in FORWARD_SECRECY_MODES:
                what = f"vsc ping ({suite.label}, forward secrecy {fs})"
                cmd = [self.vsc, "ping", "--server", self.server.endpoint, "--server-key", self.fingerprint,
                       "--suites", suite.label, "--forward-secrecy", fs, "--count", str(count), "--json"]
                proc = self.run(cmd, what, check=False, show=False)
                if proc.returncode != 0:
                    raise cli.CommandError(f"{what} failed (exit {proc.returncode}): {last_line(proc.stderr)}; "
                                           f"see {shown(self.server_log)}")
                r = parse_json(proc, what)
                problems = []
                if r.get("suite") != suite.label:
                    problems.append(f"negotiated {r.get('suite')!r}")
                if bool(r.get("forward_secret")) != (fs == "require"):
                    problems.append(f"forward_secret={r.get('forward_secret')!r}")
                if r.get("server_key") != self.fingerprint:
                    problems.append(f"server key {r.get('server_key')!r} is not the pinned one")
                if r.get("records") != count:
                    problems.append(f"{r.get('records')!r} records instead of {count}")
                if problems:
                    raise cli.CommandError(f"{what}: unexpected result: {'; '.join(problems)}")
                fs_text = "X25519 (forward secret)" if r["forward_secret"] else "off (plain Figure 7)"
                records = f"{r['records']} x {r.get('record_bytes', '?')} B, all echoed"
                rtt = r.get("median_rtt_ms")
                say(f"   {suite.label:<24} {fs_text:<23} {r.get('handshake_ms', 0):>7.1f} ms  {records:<22} "
                    f"{(f'{rtt:.2f} ms' if rtt is not None else '-'):>10}")
        wrong = [self.vsc, "ping", "--server", self.server.endpoint, "--server-key", wrong_fingerprint()]
        proc = self.run(wrong, "vsc ping with a wrong pinned key", check=False)
        if proc.returncode == 0:
            raise cli.CommandError("the handshake with a WRONG pinned key succeeded: server key pinning is broken")
        message = last_line(proc.stderr)
        if "SERVER_KEY_MISMATCH" not in message:
            raise cli.CommandError(f"the wrong-key ping failed for another reason than the pin: {message}")
        say(f"   a wrong pinned key is refused (exit {proc.returncode}): {message}")

    # ------------------------------------------------------------ 9. stay up

    def _card_says(self) -> list[str]:
        """The lines the card process wrote for its user (``vsc-card: ...``) in its log."""
        try:
            text = self.card_log.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if "vsc-card: " in ln]

    def ssh_agent_socket(self) -> str | None:
        """The card process's ssh-agent socket, when this version of it serves one."""
        marker = "vsc-card: ssh-agent on "
        for line in self._card_says():
            if marker in line:
                return line.split(marker, 1)[1].split(";", 1)[0].strip() or None
        return None

    def stay_up(self) -> None:
        """Watch the children until Ctrl-C or SIGTERM (which raise out of the sleep)."""
        assert self.server is not None and self.card is not None
        card_noted = False
        while True:
            code = self.server.returncode
            if code is not None:
                raise cli.CommandError(f"the server exited unexpectedly (code {code}); see {shown(self.server_log)}\n"
                                       f"{tail(self.server_log)}")
            if not card_noted and not self.card.running():
                card_noted = True
                code = self.card.returncode
                card_process_ended(code, f"code {code}" if code > 0 else exit_text(code))
            time.sleep(0.25)  # clock-ok: waiting for Ctrl-C while watching the children

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> dict | None:
        """Remove the card, stop the server, return the card's final record. Bounded; raises CommandError."""
        self.heading("Stopping: remove the card, then stop the server")
        problems = []
        if self.card is not None and self.card.running():
            say(f"   SIGTERM to the card process (pid {self.card.pid}): it uploads the card, sets it idle, exits")
            t0 = clock()
            code = self.card.stop()
            if self.card.killed:
                problems.append(f"the card process did not exit within {CARD_STOP_TIMEOUT:.0f} s and was killed; "
                                f"see {shown(self.card_log)}")
            else:
                how = f"exit code {code}" if code >= 0 else f"ended by {signal.Signals(-code).name}"
                said = [ln.split("vsc-card: ", 1)[1].strip() for ln in self._card_says()
                        if "removed" in ln or "remove failed" in ln]
                say(f"   card process exited after {clock() - t0:.2f} s ({how}); it said: "
                    f"{said[-1] if said else '(nothing about the removal; see ' + shown(self.card_log) + ')'}")
        if self.server is not None and self.server.running():
            info = self.show_card(show=False)
            if info is not None and info["state"] == "in-use":
                status = self.card_daemon_answers()
                if status is not None:
                    say("   another card process (started by hand) still serves the card: removing it through it")
                    self.run(self.card_cmd("remove", "--json"), "vsc card remove", env=self.card_env)
                else:
                    say("   the card is still in use with no card process left: recovering it")
                    self.recover()
            t0 = clock()
            pid = self.server.pid
            code = self.server.stop()
            if self.server.killed:
                problems.append(f"the server did not exit within {STOP_TIMEOUT:.0f} s and was killed; "
                                f"see {shown(self.server_log)}")
            elif code not in (0, -signal.SIGTERM):
                problems.append(f"the server exited with code {code} when stopped; see {shown(self.server_log)}")
            else:
                say(f"   server stopped (pid {pid}) after {clock() - t0:.2f} s; nothing is left running")
        final = None
        if (self.server_dir / "vsc-server.ini").exists():
            final = self.show_card()
            if final is not None:
                say("   " + highlights(final))
        if problems:
            raise cli.CommandError("; ".join(problems))
        return final

    def kill_all(self) -> None:
        for child in (self.card, self.server):
            if child is not None:
                child.stop(timeout=5.0)


