"""
A headless OpenSSH server for the tests: ``/usr/sbin/sshd -D`` on a
loopback port, with its own host key, configuration and authorized_keys
in a temporary directory, run as the current user (root included:
StrictModes no, public-key authentication only, no PAM). ``Sshd.login``
runs a real ``ssh`` to it and says whether the login succeeded.

Missing sshd/ssh: the tests skip (fail under VSC_REQUIRE_INTEGRATION=1).
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import time
from pathlib import Path

from tests.integration import missing, need_program

SSHD = "/usr/sbin/sshd"
START_TIMEOUT = 15.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """One sshd on 127.0.0.1:port for ``authorized`` (authorized_keys lines); stop() when done."""

    def __init__(self, root: Path, authorized: list[str]):
        if not os.path.exists(SSHD):
            missing("sshd is not installed (apt-get install openssh-server)")
        self.ssh = need_program("ssh")
        keygen = need_program("ssh-keygen")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.user = getpass.getuser()
        self.port = _free_port()
        self.host_key = self.root / "host_ed25519"
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True,
                       capture_output=True, timeout=30)
        self.authorized_keys = self.root / "authorized_keys"
        self.set_authorized(authorized)
        self.log = self.root / "sshd.log"
        self.config = self.root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.root / 'sshd.pid'}", f"AuthorizedKeysFile {self.authorized_keys}",
            "StrictModes no", "UsePAM no", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "LogLevel VERBOSE",
            "PubkeyAcceptedAlgorithms +ssh-rsa", "MaxAuthTries 10", "",
        ]))
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"sshd exited ({self.proc.returncode}):\n{self.log.read_text(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"sshd did not listen:\n{self.log.read_text(errors='replace')}") from None
                time.sleep(0.05)

    def set_authorized(self, lines: list[str]) -> None:
        self.authorized_keys.write_text("".join(line.strip() + "\n" for line in lines))
        self.authorized_keys.chmod(0o600)

    def login(self, env: dict, *options: str, batch: bool = True,
              command: str = "echo vsc-login-ok") -> subprocess.CompletedProcess:
        """
        ``ssh`` to this server with ``env`` (SSH_AUTH_SOCK, SSH_ASKPASS...) and
        extra options; no host-key questions. ``batch=False`` lets ssh ask for
        a PKCS#11 PIN (through SSH_ASKPASS: BatchMode turns PIN entry off).
        """
        argv = [self.ssh, "-F", "/dev/null", "-p", str(self.port), "-o", f"BatchMode={'yes' if batch else 'no'}",
                "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={self.root / 'known_hosts'}",
                "-o", "PasswordAuthentication=no", "-o", "ConnectTimeout=20", *options,
                f"{self.user}@127.0.0.1", command]
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)

    def logged_in(self, env: dict, *options: str, batch: bool = True) -> bool:
        result = self.login(env, *options, batch=batch)
        return result.returncode == 0 and "vsc-login-ok" in result.stdout

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
