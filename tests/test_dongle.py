"""
Dongle mode (claim 10, Figures 14 and 15) against a real PKCS#11 token.

SoftHSM2 stands in for the hardware dongle: every test gets its own token
directory (``SOFTHSM2_CONF`` pointing at a config in tmp_path; the system
token directory is never touched) and real processes: ``vsc dongle
provision|enroll|replace``, ``twistd -n vsc-card`` (dongle mode from
card.ini) and ``vsc card ...`` on its control socket. python-pkcs11 is used
directly only in short subprocesses (``Lab.pk11``): SoftHSM2 reads its config
once per process, so every token directory needs its own process.

Without softhsm2-util, libsofthsm2.so, openssl or python-pkcs11 these tests
skip locally and FAIL under VSC_REQUIRE_INTEGRATION=1 (tests.integration).
Every wait is bounded; daemons still running at teardown are killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration import missing, need_program
from tests.servers import _env

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
VSC = BIN / "vsc"
MODULE = Path(os.environ.get("VSC_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so"))
PIN = "1234"
SO_PIN = "5678"
PASSWORD = "owner's password"
POLL = 1.0  # dongle_poll of every test card: the token check repeats every second
START_TIMEOUT = 20.0
CLI_TIMEOUT = 30.0


# ---------------------------------------------------------------- prerequisites


@pytest.fixture(scope="module")
def dongle_stack():
    """SoftHSM2 (softhsm2-util and its PKCS#11 module), openssl, and python-pkcs11 (the ``dongle`` extra)."""
    need_program("softhsm2-util")
    need_program("openssl")
    if not MODULE.exists():
        missing(f"the SoftHSM2 PKCS#11 module {MODULE} is not installed (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        missing("python-pkcs11 is not installed (pip install -e '.[dongle]')")


# ---------------------------------------------------------------- the lab: token dirs, commands, card daemons


class Hsm:
    """One SoftHSM2 token directory with its own config file (one 'USB port' full of tokens)."""

    def __init__(self, root: Path):
        self.root = root
        self.tokendir = root / "tokens"
        self.tokendir.mkdir(parents=True)
        self.conf = root / "softhsm2.conf"
        self.conf.write_text(f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n")

    def init_token(self, label: str, pin: str = PIN) -> str:
        """``softhsm2-util --init-token --free``: a fresh, empty token; its pkcs11: URI (no PIN in it)."""
        proc = subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", SO_PIN],
            env=dict(os.environ, SOFTHSM2_CONF=str(self.conf)), capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return self.uri(label)

    @staticmethod
    def uri(label: str) -> str:
        return f"pkcs11:token={label};module-path={MODULE}"

    def pull_all(self) -> None:
        """Pull every token out: delete the token directories (SoftHSM2 keeps one per token)."""
        for d in self.tokendir.iterdir():
            shutil.rmtree(d)


class Card:
    """``twistd -n vsc-card --home HOME --password-file F --token-pin-file P`` with its output in a log."""

    def __init__(self, lab: "Lab", home: Path, hsm: Hsm, password_file: Path, pin_file: Path, name: str):
        self.lab, self.home, self.hsm = lab, home, hsm
        self.password_file, self.pin_file = password_file, pin_file
        self.log_path = lab.root / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def vsc_lines(self) -> list[str]:
        """The daemon's own one-line messages ("vsc-card: ...") from its log."""
        return [line[line.index("vsc-card: "):] for line in self.log().splitlines() if "vsc-card: " in line]

    def spawn(self, lock_dir: Path | None = None) -> "Card":
        env = self.lab.env(self.hsm)
        if lock_dir is not None:
            env["VSC_LOCK_DIR"] = str(lock_dir)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.home),
                 "--password-file", str(self.password_file), "--token-pin-file", str(self.pin_file)],
                cwd=self.lab.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.lab.cards.append(self)
        return self

    def start(self, **kw) -> "Card":
        """Start and wait (bounded) until the card is inserted."""
        self.spawn(**kw)
        self.wait_for("inserted; control socket")
        return self

    def wait_for(self, text: str) -> str:
        """Wait (bounded) until ``text`` is in the log, and return the log. The daemon's services start one
        after another, so a line printed after the insert (the ssh-agent's) can come a moment later."""
        deadline = time.monotonic() + START_TIMEOUT
        while text not in (log := self.log()):
            if self.proc.poll() is not None:
                raise AssertionError(f"vsc-card exited with {self.proc.returncode} before {text!r}:\n{log[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from vsc-card within {START_TIMEOUT:g} s:\n{log[-3000:]}")
            time.sleep(0.05)
        return log

    def refused(self, **kw) -> tuple[int, list[str]]:
        """Start a card that must NOT insert: its exit status and its vsc-card: lines."""
        self.spawn(**kw)
        code = self.proc.wait(START_TIMEOUT)
        assert "inserted; control socket" not in self.log(), self.log()
        return code, self.vsc_lines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def remove(self) -> None:
        """``vsc card remove``: written back to the token, erased; the daemon exits 0."""
        self.lab.vsc("card", "--home", str(self.home), "remove", hsm=self.hsm)
        assert self.proc.wait(15) == 0, self.log()[-3000:]


class Lab:
    def __init__(self, root: Path, runtime: Path):
        self.root = root
        self.runtime = runtime  # short: UNIX socket paths are limited
        self.hsm = Hsm(root / "hsm")
        self.password_file = root / "pw"
        self.password_file.write_text(PASSWORD + "\n")
        self.pin_file = root / "tpin"
        self.pin_file.write_text(PIN + "\n")
        self.issuer = root / "issuer"
        self.cards: list[Card] = []

    def env(self, hsm: Hsm | None = None) -> dict:
        return dict(_env(), SOFTHSM2_CONF=str((hsm or self.hsm).conf), VSC_LOCK_DIR=str(self.root / "lock"),
                    XDG_RUNTIME_DIR=str(self.runtime))

    def vsc(self, *args: str, hsm: Hsm | None = None, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VSC), *args], env=self.env(hsm), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=CLI_TIMEOUT, cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"vsc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def vsc_json(self, *args: str, hsm: Hsm | None = None):
        return json.loads(self.vsc(*args, "--json", hsm=hsm).stdout)

    # -- the issuer and the owner

    def provision(self, label: str, serial: str = "dg-1", hsm: Hsm | None = None, entries: int = 16) -> Path:
        """Issuer: a DongleKey on the token and its challenge table (kept in the issuer's records too)."""
        table = self.root / f"table-{label}"
        self.vsc("dongle", "provision", "--token", (hsm or self.hsm).uri(label), "--token-pin-file", str(self.pin_file),
                 "--serial", serial, "--table", str(table), "--entries", str(entries),
                 "--issuer-dir", str(self.issuer), hsm=hsm)
        return table

    def enroll(self, home: Path, label: str, table: Path, hsm: Hsm | None = None, *extra: str) -> None:
        """Owner: keys made locally, sealed under the password key, written to the token; HOME/card.ini.
        These tests sign with 9C locally without a PIN, so 9C's policy is once (the policies: tests/test_pin_*.py)."""
        self.vsc("dongle", "enroll", "--home", str(home), "--token", (hsm or self.hsm).uri(label),
                 "--token-pin-file", str(self.pin_file), "--table", str(table), "--password-file",
                 str(self.password_file), "--scrypt-log2n", "12", "--poll", str(POLL),
                 "--issuer-dir", str(self.issuer), *(extra or ("--pin-policy", "9c=once")), hsm=hsm)

    def new_card(self) -> tuple[Path, Path]:
        """A fresh token "dongle1", provisioned and enrolled as card dg-1: (HOME, table)."""
        self.hsm.init_token("dongle1")
        table = self.provision("dongle1", "dg-1")
        self.enroll(self.root / "home", "dongle1", table)
        return self.root / "home", table

    def clone_card(self, template: "Lab") -> tuple[Path, Path]:
        """The template's enrolled card, cloned into this lab: its token dir, HOME, table and issuer record
        copied (saves a provision and an enrol per test; the copy is a working token, which is exactly the
        limit of a software token that docs/dongle.md states)."""
        shutil.copytree(template.hsm.tokendir, self.hsm.tokendir, dirs_exist_ok=True)
        shutil.copytree(template.root / "home", self.root / "home")
        shutil.copytree(template.issuer, self.issuer)
        table = self.root / "table-dongle1"
        shutil.copyfile(template.root / "table-dongle1", table)
        return self.root / "home", table

    def card(self, home: Path, hsm: Hsm | None = None, password_file: Path | None = None,
             pin_file: Path | None = None, name: str | None = None) -> Card:
        return Card(self, home, hsm or self.hsm, password_file or self.password_file, pin_file or self.pin_file,
                    name or f"card{len(self.cards) + 1}")

    def control_socket(self, home: Path) -> Path:
        """Where the card daemon of ``home`` listens (vsc.card.config.control_socket_for, in our runtime dir)."""
        return self.runtime / "vsc" / f"card-{hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:12]}.sock"

    def status(self, home: Path) -> dict:
        return self.vsc_json("card", "--home", str(home), "status")

    def counter(self, home: Path, name: str, add: int | None = None) -> int:
        extra = ("--add", str(add)) if add is not None else ()
        return self.vsc_json("card", "--home", str(home), "counter", name, *extra)["value"]

    # -- python-pkcs11, in a process of its own (SoftHSM2 reads SOFTHSM2_CONF once per process)

    def pk11(self, code: str, hsm: Hsm | None = None, **values) -> dict:
        """Run ``code`` with ``ref`` (a TokenRef), ``values`` and ``out`` (a dict printed as JSON) defined."""
        prelude = textwrap.dedent(f"""
            import json, os, sys
            import pkcs11
            from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
            from vsc.dongle.token import (DONGLE_KEY_LABEL, KDF_LABEL, PROTECTED_LABEL, Token, TokenError,
                                          TokenRef)
            values = json.loads({json.dumps(json.dumps(values))})
            ref = TokenRef.parse(values.get("uri") or "pkcs11:token=dongle1;module-path={MODULE}", {PIN!r})
            out = {{}}
        """)
        proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code) + "\nprint(json.dumps(out))"],
                              env=self.env(hsm), capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=self.root)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def objects(self, label: str = "dongle1", hsm: Hsm | None = None) -> dict:
        """The card's data objects on the token: {label: [(generation, sha256 of the value), ...]}."""
        return self.pk11("""
            with Token(ref) as tok:
                for name in (PROTECTED_LABEL, KDF_LABEL):
                    out[name] = sorted((tok._generation(o), __import__("hashlib").sha256(bytes(o[Attribute.VALUE])).hexdigest())
                                       for o in tok._objects(name))
        """, hsm, uri=(hsm or self.hsm).uri(label))


@contextlib.contextmanager
def _lab(root: Path):
    runtime = Path(tempfile.mkdtemp(prefix="vscdg-", dir="/tmp"))
    lab = Lab(root, runtime)
    try:
        yield lab
    finally:
        for card in lab.cards:
            if card.proc is not None and card.proc.poll() is None:
                card.proc.kill()
                card.proc.wait(10)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture(scope="module")
def template(tmp_path_factory, dongle_stack):
    """One card provisioned and enrolled by the real commands, for the tests to clone (Lab.clone_card)."""
    with _lab(tmp_path_factory.mktemp("dongle-template")) as lab:
        lab.new_card()
        yield lab


@pytest.fixture
def lab(tmp_path, dongle_stack):
    """A private SoftHSM2 token dir, runtime dir, machine lock dir and password/PIN files for one test."""
    with _lab(tmp_path) as lab:
        yield lab


@pytest.fixture
def enrolled(lab, template):
    """``lab`` holding its own copy of the template card: (lab, HOME, table)."""
    home, table = lab.clone_card(template)
    return lab, home, table


def openssl_verify(public_pem: Path, data: Path, signature: Path) -> None:
    proc = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(public_pem), "-signature", str(signature),
                           str(data)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "Verified OK" in proc.stdout, proc.stdout + proc.stderr


def assert_refused(lines: list[str], reason: str) -> None:
    """Exactly one line from the refused daemon: "vsc-card: insert refused: REASON" (an exception class name
    in front of the reason is tolerated: it is vsc.card.session.explain's business)."""
    assert len(lines) == 1, lines
    assert re.fullmatch(r"vsc-card: insert refused: (\w+: )?" + re.escape(reason), lines[0]), lines


def public_keys(lab: Lab, home: Path) -> dict:
    return {slot: v["public_key_sha256"] for slot, v in lab.status(home)["slots"].items()}


# ---------------------------------------------------------------- unit: the pkcs11: URI and the challenge table


def test_token_ref_parse(monkeypatch):
    """pkcs11: URIs: token= is required (and not empty), module-path= and pin-value= are taken (also as RFC 7512
    query attributes, percent-decoded; without module-path=, $VSC_PKCS11_MODULE or SoftHSM2's module); a PIN
    given apart (--token-pin-file) wins over pin-value= and never shows in repr; no PIN at all is an error."""
    from vsc.dongle.token import TokenError, TokenRef

    ref = TokenRef.parse("pkcs11:token=my%20dongle;module-path=/opt/lib/x.so;pin-value=9999")
    assert (ref.module, ref.token_label, ref.pin) == ("/opt/lib/x.so", "my dongle", "9999")
    ref = TokenRef.parse("pkcs11:token=t?module-path=/opt/lib/y.so&pin-value=1111")
    assert (ref.module, ref.token_label, ref.pin) == ("/opt/lib/y.so", "t", "1111")
    assert TokenRef.parse("pkcs11:token=t;module-path=/m.so;pin-value=1111", "2222").pin == "2222"
    assert "9999" not in repr(TokenRef.parse("pkcs11:token=t;module-path=/m.so;pin-value=9999"))
    monkeypatch.setenv("VSC_PKCS11_MODULE", "/opt/hsm/vendor.so")
    assert TokenRef.parse("pkcs11:token=t", "1").module == "/opt/hsm/vendor.so"  # no module-path=: the default
    monkeypatch.delenv("VSC_PKCS11_MODULE")
    assert TokenRef.parse("pkcs11:token=t", "1").module == "/usr/lib/softhsm/libsofthsm2.so"
    with pytest.raises(TokenError, match="needs token=LABEL"):
        TokenRef.parse("pkcs11:module-path=/m.so;pin-value=1")
    with pytest.raises(TokenError, match="needs token=LABEL"):
        TokenRef.parse("pkcs11:token=;module-path=/m.so;pin-value=1")
    with pytest.raises(TokenError, match="no token PIN"):
        TokenRef.parse("pkcs11:token=t;module-path=/m.so")
    with pytest.raises(TokenError, match="not a pkcs11: URI"):
        TokenRef.parse("token=t;pin-value=1")


def _refusal(fn, *args) -> str:
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001
        return str(e)
    raise AssertionError("not refused")


def test_challenge_table_codec():
    """The Figure 14 table: round trip; trailing bytes, truncation, a wrong magic, no entries and more than
    4096 entries are refused (WireError, one line) both when decoding and when encoding."""
    from vsc.wire.dongle import ChallengeTable, decode_table, encode_table
    from vsc.wire.errors import WireError

    rows = tuple((bytes([i]) * 16, bytes([255 - i]) * 16) for i in range(8))
    table = ChallengeTable(serial="dg-1", entries=rows)
    data = encode_table(table)
    assert decode_table(data) == table
    assert len(data) == 4 + 1 + 1 + 4 + 2 + 8 * 32

    bad = {
        "trailing": data + b"\0",
        "truncated": data[:-1],
        "header only": data[:6],
        "empty": b"",
        "magic": b"VSCX" + data[4:],
        "format": data[:4] + b"\x02" + data[5:],
        "no entries": data[:10] + b"\0\0",
        "too many": data[:10] + struct.pack(">H", 4097) + bytes(32 * 4097),
        "count beyond data": data[:10] + struct.pack(">H", 9) + data[12:],
    }
    for what, blob in bad.items():
        with pytest.raises(WireError) as e:
            decode_table(blob)
        assert "\n" not in str(e.value), what
    assert "4097" in _refusal(decode_table, bad["too many"])

    with pytest.raises(WireError, match="4097"):
        encode_table(ChallengeTable(serial="s", entries=(rows[0],) * 4097))
    with pytest.raises(WireError):
        encode_table(ChallengeTable(serial="s", entries=((b"short", rows[0][1]),)))
    with pytest.raises(WireError):
        encode_table(ChallengeTable(serial="", entries=rows))
    assert decode_table(encode_table(ChallengeTable(serial="s", entries=(rows[0],) * 4096))).entries[4095] == rows[0]


def test_dongle_setup_reads_card_ini(tmp_path):
    """twistd vsc-card's dongle settings: the table name in card.ini is relative to HOME (a copied or moved
    HOME uses its own table, whatever the cwd); a table of another card, a damaged table and a missing one are
    refused with one line before anything touches a token."""
    from vsc.card import config as cc
    from vsc.dongle.config import TABLE_NAME, dongle_setup
    from vsc.wire.dongle import ChallengeTable, encode_table

    home = tmp_path / "home"
    cc.save(home, mode="dongle", serial="dg-1", token=f"pkcs11:token=t;module-path={MODULE}", table=TABLE_NAME,
            dongle_poll="2.5")
    table = ChallengeTable(serial="dg-1", entries=((b"c" * 16, b"r" * 16),))
    (home / TABLE_NAME).write_bytes(encode_table(table))
    pin = tmp_path / "pin"
    pin.write_text("4321\n")
    ref, got, poll = dongle_setup(cc.load(home), None, str(pin))
    assert (ref.token_label, ref.pin, got, poll) == ("t", "4321", table, 2.5)
    moved = tmp_path / "moved"
    home.rename(moved)
    assert dongle_setup(cc.load(moved), None, str(pin))[1] == table

    (moved / TABLE_NAME).write_bytes(encode_table(ChallengeTable(serial="other", entries=table.entries)))
    with pytest.raises(ValueError, match="is for the card 'other', not 'dg-1'"):
        dongle_setup(cc.load(moved), None, str(pin))
    (moved / TABLE_NAME).write_bytes(encode_table(table)[:-3])
    with pytest.raises(ValueError, match="is not a challenge table") as e:
        dongle_setup(cc.load(moved), None, str(pin))
    assert "\n" not in str(e.value)
    (moved / TABLE_NAME).unlink()
    with pytest.raises(ValueError, match="cannot read the challenge table"):
        dongle_setup(cc.load(moved), None, str(pin))


def test_a_failing_token_check_of_any_kind_removes_the_card(tmp_path):
    """The periodic check fails closed: a wrong answer, a TokenError, and any other exception out of the
    PKCS#11 library (a token pulled between opening a session and using it) each erase the card and exit
    with code 5 and a "dongle check failed" line; a good answer keeps it in use; a check that fails after the
    card was removed in the meantime does nothing more."""
    from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
    from twisted.internet.task import Clock

    from tests.cardfakes import MemoryStorage, in_use_session, release
    from vsc.card.config import CardConfig
    from vsc.card.protected import seal_envelope
    from vsc.card.session import LifeState
    from vsc.dongle.storage import TokenCalls, TokenStorage
    from vsc.dongle.token import TokenError, TokenRef
    from vsc.wire.dongle import ChallengeTable

    ref = TokenRef.parse(f"pkcs11:token=t;module-path={MODULE}", PIN)
    table = ChallengeTable(serial="dg-1", entries=((b"c" * 16, b"r" * 16),))
    config = CardConfig(home=tmp_path, server="", server_key="", serial="dg-1", muk_poll=0, clock_poll=0)
    envelope = seal_envelope("dg-1", b"k" * 32, [], os.urandom)

    def session_with(check, worker=None):
        """An in-use card whose periodic check is a TokenStorage's, on a Clock: the check runs at 1 s."""
        token = TokenStorage(config, ref, table, 1.0, worker=worker or (lambda fn, *a: maybeDeferred(fn, *a)),
                             calls=TokenCalls(check=check))
        storage = MemoryStorage("dg-1", envelope, b"k" * 32, os.urandom, checks=token.checks())
        clock, exits = Clock(), []
        s = in_use_session(config, storage, os.urandom, clock, on_exit=lambda code, why: exits.append((code, why)))
        return s, clock, exits

    s, clock, exits = session_with(lambda *a: True)
    clock.advance(1)
    assert (s.life, exits) == (LifeState.IN_USE, [])
    release(s)

    def raises(e):
        def check(*a):
            raise e
        return check

    for check, why in ((lambda *a: False, "does not match the challenge table"),
                       (raises(TokenError("the token 't' is not present")), "is not present"),
                       (raises(RuntimeError("CKR_DEVICE_REMOVED")), "the token failed: RuntimeError")):
        s, clock, exits = session_with(check)
        memory = s.memory
        clock.advance(1)
        assert s.life is LifeState.EXITED and memory.wiped and not s.lock.held and len(exits) == 1, exits
        code, line = exits[0]
        assert code == 5 and line.startswith("dongle check failed: ") and why in line, line
        assert line.endswith("; the card was removed")

    pending = Deferred()
    s, clock, exits = session_with(lambda *a: True, worker=lambda fn, *a: pending)  # the check is still running...
    clock.advance(1)
    ensureDeferred(s.remove("test"))  # ...when the owner removes the card
    assert s.life is LifeState.IDLE
    pending.errback(TokenError("the token 't' is not present"))
    assert exits == [] and s.life is LifeState.IDLE


# ---------------------------------------------------------------- the card on a token


def test_insert_sign_count_remove_and_reinsert(lab):
    """A SoftHSM2-backed card inserts (dongle mode from card.ini), signs with an RSA and a P-256 slot
    (verified by openssl against `vsc card public-key`), and a counter step is on the token before it is
    acknowledged (a new generation of the protected information). Remove writes back and erases; the
    re-inserted card sees the same keys, the counter and a data object."""
    home, _table = lab.new_card()
    ini = (home / "card.ini").read_text()
    assert "mode = dongle" in ini and PIN not in ini and str(lab.root) not in ini  # no PIN, no cwd-relative path
    card = lab.card(home).start()
    st = lab.status(home)
    assert (st["state"], st["mode"], st["token"], st["serial"]) == ("in-use", "dongle", "dongle1", "dg-1")
    assert set(st["slots"]) == {"9a", "9c", "9d", "9e"} and st["memory_locked"] is True
    keys = {slot: v["public_key_sha256"] for slot, v in st["slots"].items()}
    assert lab.control_socket(home).exists()

    msg = lab.root / "message"
    msg.write_bytes(b"signed by a card that lives on a token\n")
    for slot in ("9a", "9c"):
        pem = lab.root / f"{slot}.pem"
        pem.write_text(lab.vsc("card", "--home", str(home), "public-key", "--slot", slot).stdout)
        sig = lab.root / f"{slot}.sig"
        lab.vsc("card", "--home", str(home), "sign", "--slot", slot, "--in", str(msg), "--out", str(sig))
        openssl_verify(pem, msg, sig)

    before = lab.objects()
    assert len(before["vsc-protected"]) == 1
    assert lab.counter(home, "c", add=2) == 2
    after = lab.objects()
    assert len(after["vsc-protected"]) == 1  # the old generation was deleted after the new one was written
    assert after["vsc-protected"][0][0] > before["vsc-protected"][0][0]
    assert after["vsc-protected"][0][1] != before["vsc-protected"][0][1]
    secret = lab.root / "secret"
    secret.write_bytes(os.urandom(100))
    lab.vsc("card", "--home", str(home), "data", "put", "note", "--in", str(secret))

    card.remove()
    assert "removed" in card.log()
    assert not lab.control_socket(home).exists()  # erased, daemon gone

    lab.card(home).start()
    assert lab.counter(home, "c") == 2
    assert public_keys(lab, home) == keys
    out = lab.root / "secret.out"
    lab.vsc("card", "--home", str(home), "data", "get", "note", "--out", str(out))
    assert out.read_bytes() == secret.read_bytes()
    assert lab.counter(home, "c", add=3) == 5


@pytest.mark.parametrize("how", ["deleted", "swapped"])
def test_pulling_the_token_stops_the_card_within_the_poll_interval(enrolled, how):
    """With dongle_poll = 1 s, pulling the token (its directory deleted; or deleted and replaced at once by a
    fresh token with the same label and PIN) makes the card remove itself: the daemon exits non-zero with a
    "dongle check failed" line within poll + 2 s, its control socket gone. The last acknowledged state is
    on the token (a copy of the token dir taken before the pull holds it)."""
    lab, home, _ = enrolled
    card = lab.card(home).start()
    assert lab.counter(home, "c", add=7) == 7
    saved = lab.root / "saved-tokens"
    shutil.copytree(lab.hsm.tokendir, saved)

    t0 = time.monotonic()
    lab.hsm.pull_all()
    if how == "swapped":
        lab.hsm.init_token("dongle1")
    code = card.proc.wait(POLL + 2)  # raises TimeoutExpired if it did not stop in time
    latency = time.monotonic() - t0
    print(f"\n[{how}] the card stopped {latency:.2f} s after the token was pulled (poll {POLL:g} s)")
    assert code == 5, card.log()  # docs/card.md: the token check failed, the card was removed
    lines = [line for line in card.vsc_lines() if "dongle check failed" in line]
    assert len(lines) == 1 and "the card was removed" in lines[0], card.vsc_lines()
    assert "Traceback" not in card.log()
    assert not lab.control_socket(home).exists()

    # plug the saved token back in: the acknowledged counter step is on it
    shutil.rmtree(lab.hsm.tokendir)
    shutil.copytree(saved, lab.hsm.tokendir)
    lab.card(home).start()
    assert lab.counter(home, "c") == 7


def test_remove_after_the_token_was_pulled_still_erases_the_card(enrolled):
    """The token is pulled between two checks (poll 60 s here) and the owner removes the card: the write-back
    fails, but every change was on the token already, so the card is erased and the daemon exits non-zero
    with one clear line, instead of staying in use with its token check stopped."""
    lab, home, _ = enrolled
    ini = home / "card.ini"
    ini.write_text(ini.read_text().replace("dongle_poll = 1.0", "dongle_poll = 60"))
    card = lab.card(home).start()
    lab.hsm.pull_all()
    proc = lab.vsc("card", "--home", str(home), "remove", check=False)
    assert proc.returncode != 0
    assert "removed anyway" in proc.stderr, proc.stderr
    assert card.proc.wait(10) == 5
    assert any("removed anyway" in line for line in card.vsc_lines()), card.log()


def test_a_copied_home_without_the_token_is_refused_and_the_dongle_key_is_not_extractable(enrolled):
    """Copying HOME (card.ini and the challenge table) to another machine and pointing it at a different,
    freshly initialised SoftHSM2 token is refused with a clear line: a fresh token with the SAME label (in
    another token dir) has no DongleKey; a token provisioned with its own DongleKey and even holding copies
    of the card's data objects (everything the PIN gives) fails the challenge table. The DongleKey was
    generated on the token (CKA_LOCAL), is sensitive and non-extractable from the start, its value cannot be
    read and it cannot be wrapped out."""
    lab, home, table = enrolled
    other = Hsm(lab.root / "other-machine")
    copy = lab.root / "copied-home"
    shutil.copytree(home, copy)
    lock2 = lab.root / "lock2"  # another machine: its own machine lock

    # 1. a fresh token with the same label and PIN
    other.init_token("dongle1")
    code, lines = lab.card(copy, hsm=other).refused(lock_dir=lock2)
    assert code != 0
    assert_refused(lines, "dongle check failed: the token holds no DongleKey")

    # 2. a token with a DongleKey of its own and copies of the card's data objects
    other.init_token("attacker")
    lab.vsc("dongle", "provision", "--token", other.uri("attacker"), "--token-pin-file", str(lab.pin_file),
            "--serial", "dg-1", "--table", str(lab.root / "attacker-table"), hsm=other)
    stolen = lab.pk11("""
        with Token(ref) as tok:
            out = {name: tok.read(name).hex() for name in (PROTECTED_LABEL, KDF_LABEL)}
    """)
    lab.pk11("""
        with Token(ref, rw=True) as tok:
            for name, value in values["objects"].items():
                tok.write(name, bytes.fromhex(value))
    """, other, uri=other.uri("attacker"), objects=stolen)
    ini = copy / "card.ini"
    ini.write_text(ini.read_text().replace("token=dongle1", "token=attacker"))
    code, lines = lab.card(copy, hsm=other).refused(lock_dir=lock2)
    assert code != 0
    assert_refused(lines, "dongle check failed: the token's answer does not match the challenge table")

    # the original still works on its own token
    lab.card(home).start()
    assert lab.status(home)["state"] == "in-use"

    attrs_ = lab.pk11("""
        with Token(ref) as tok:
            key = tok._find_key()
            for name in ("SENSITIVE", "EXTRACTABLE", "ALWAYS_SENSITIVE", "NEVER_EXTRACTABLE", "LOCAL", "TOKEN",
                         "PRIVATE", "DECRYPT", "WRAP", "UNWRAP"):
                out[name] = bool(key[getattr(Attribute, name)])
            try:
                key[Attribute.VALUE]
                out["value"] = "read"
            except pkcs11.exceptions.PKCS11Error as e:
                out["value"] = type(e).__name__
            wrapper = tok._session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
            try:
                wrapper.wrap_key(key, mechanism=Mechanism.AES_KEY_WRAP)
                out["wrap"] = "wrapped"
            except pkcs11.exceptions.PKCS11Error as e:
                out["wrap"] = type(e).__name__
    """)
    assert attrs_["SENSITIVE"] is True and attrs_["EXTRACTABLE"] is False
    assert attrs_["ALWAYS_SENSITIVE"] is True and attrs_["NEVER_EXTRACTABLE"] is True and attrs_["LOCAL"] is True
    assert attrs_["TOKEN"] is True and attrs_["PRIVATE"] is True
    assert attrs_["DECRYPT"] is False and attrs_["WRAP"] is False and attrs_["UNWRAP"] is False
    assert attrs_["value"] == "AttributeSensitive", attrs_
    assert attrs_["wrap"] == "KeyUnextractable", attrs_
    assert table.read_bytes()  # the table itself is no secret: it only proves that the token answers


def test_wrong_owner_password_and_wrong_token_pin(enrolled):
    """A wrong owner password is refused with one line that names nothing of the card (no slot, key, counter
    or data object name) and leaves the token unchanged; a wrong token PIN gives "the token PIN is wrong";
    the right ones still insert."""
    lab, home, _ = enrolled
    card = lab.card(home).start()
    lab.counter(home, "rental-units", add=3)
    lab.vsc("card", "--home", str(home), "data", "put", "diary", "--in", str(lab.password_file))
    keys = public_keys(lab, home)
    card.remove()
    objects = lab.objects()

    wrong = lab.root / "wrong-pw"
    wrong.write_text("not the password\n")
    bad = lab.card(home, password_file=wrong, name="wrong-password")
    code, lines = bad.refused()
    assert code != 0
    assert_refused(lines, "refused: the password does not open the card on this token")
    log = bad.log()
    for leak in ("rental-units", "diary", "9a", "9c", "9d", "9e", *keys.values()):
        assert leak not in log, leak
    assert lab.objects() == objects  # nothing written

    wrong_pin = lab.root / "wrong-pin"
    wrong_pin.write_text("0000\n")
    code, lines = lab.card(home, pin_file=wrong_pin, name="wrong-pin").refused()
    assert code != 0
    assert_refused(lines, "dongle check failed: the token PIN is wrong")

    lab.card(home).start()  # the right password and PIN still insert: nothing was locked or changed


def test_replace_restores_the_card_onto_a_new_token(enrolled):
    """`vsc dongle replace` ([0107] Recover): from the issuer's records onto a new token with a new DongleKey
    and table. The card inserts from the new token with the same keys (same public keys); what it holds is
    the state at enrolment (a counter created later is not restored); the OLD token's table does not work
    with the new token, and the new table does not work with the old token."""
    lab, home, old_table = enrolled
    card = lab.card(home).start()
    keys = public_keys(lab, home)
    assert lab.counter(home, "after-enrolment", add=4) == 4
    card.remove()

    lab.hsm.init_token("dongle2")
    new_table = lab.root / "table-dongle2"
    out = lab.vsc_json("dongle", "replace", "--token", lab.hsm.uri("dongle2"), "--token-pin-file", str(lab.pin_file),
                       "--serial", "dg-1", "--issuer-dir", str(lab.issuer), "--table", str(new_table),
                       "--entries", "16", "--home", str(home))
    assert out["token"] == "dongle2"
    assert "token=dongle2" in (home / "card.ini").read_text()
    assert (home / "dongle-table").read_bytes() == new_table.read_bytes() != old_table.read_bytes()
    assert json.loads((lab.issuer / "dg-1.json").read_text())["token"] == "dongle2"
    for private in (lab.issuer / "dg-1.json", home / "dongle-table", new_table):
        assert private.stat().st_mode & 0o077 == 0, private  # the records unlock the card with the password

    card = lab.card(home).start()
    st = lab.status(home)
    assert st["token"] == "dongle2"
    assert public_keys(lab, home) == keys
    assert st["counters"] == []  # the issuer's records hold the card as enrolled, not later changes
    card.remove()

    # the old table with the new token
    stale = lab.root / "stale-home"
    shutil.copytree(home, stale)
    shutil.copyfile(old_table, stale / "dongle-table")
    code, lines = lab.card(stale, name="old-table").refused()
    assert code != 0
    assert_refused(lines, "dongle check failed: the token's answer does not match the challenge table")
    # the new table with the old token
    ini = stale / "card.ini"
    shutil.copyfile(new_table, stale / "dongle-table")
    ini.write_text(ini.read_text().replace("token=dongle2", "token=dongle1"))
    code, lines = lab.card(stale, name="old-token").refused()
    assert code != 0
    assert_refused(lines, "dongle check failed: the token's answer does not match the challenge table")


def test_a_crash_between_the_two_steps_of_a_token_write_keeps_a_readable_card(enrolled):
    """Token.write creates the new generation, then deletes the older ones. A process killed between the two
    steps (here: a real Token.write whose delete step calls os._exit) leaves both generations on the
    token; the card still inserts and the newest generation wins; its next write removes the stale one."""
    lab, home, _ = enrolled
    read = "with Token(ref) as tok: out['e'] = tok.read(PROTECTED_LABEL).hex()"
    e1 = lab.pk11(read)["e"]  # as enrolled: no counter
    card = lab.card(home).start()
    lab.counter(home, "c", add=1)
    card.remove()
    e2 = lab.pk11(read)["e"]  # counter c = 1

    # the token holds E1 at generation g, then a write of E2 crashes half way
    lab.pk11("with Token(ref, rw=True) as tok: tok.write(PROTECTED_LABEL, bytes.fromhex(values['e1']))", e1=e1)
    crash = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        from vsc.dongle.token import PROTECTED_LABEL, Token, TokenRef

        class Dying:  # the token's object, except that deleting it kills the process: between step 1 and 2
            def __init__(self, obj):
                self.obj = obj

            def __getitem__(self, attribute):
                return self.obj[attribute]

            def destroy(self):
                os._exit(9)

        objects = Token._objects
        Token._objects = lambda self, label: [Dying(o) for o in objects(self, label)]
        ref = TokenRef.parse("pkcs11:token=dongle1;module-path={MODULE}", {PIN!r})
        with Token(ref, rw=True) as tok:
            tok.write(PROTECTED_LABEL, bytes.fromhex({e2!r}))
        print("not killed")
    """)], env=lab.env(), capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert crash.returncode == 9, crash.stdout + crash.stderr
    gens = lab.objects()["vsc-protected"]
    sha = {e: hashlib.sha256(bytes.fromhex(e)).hexdigest() for e in (e1, e2)}
    assert len(gens) == 2 and gens[0][1] == sha[e1] and gens[1][1] == sha[e2] and gens[1][0] == gens[0][0] + 1

    lab.card(home).start()
    assert lab.counter(home, "c", add=1) == 2  # the newest generation (E2, c = 1) won, and the step is written
    after = lab.objects()["vsc-protected"]
    assert len(after) == 1 and after[0][0] == gens[1][0] + 1  # the next write cleared both older generations


def test_token_sessions_from_two_threads_are_serialised(enrolled):
    """The card daemon checks the token on one thread while a change is written on another. python-pkcs11
    initialises the module with C_Initialize(NULL) (no locking by the module), and a PKCS#11 login is shared
    by all of a process's sessions (closing one logs the other out), so Token serialises its sessions
    process-wide: 2 x 40 interleaved checks and writes on two threads all succeed. Unserialised, this gave
    spurious "not present" / UserNotLoggedIn failures (a wrongly removed card), and a card daemon with a
    short poll interval aborted with "malloc(): unaligned tcache chunk detected" within a few counter steps."""
    lab, home, table = enrolled
    result = lab.pk11("""
        import threading
        from vsc.dongle.storage import token_check, write_card
        from vsc.wire.dongle import decode_table
        table = decode_table(open(values["table"], "rb").read())
        with Token(ref) as tok:
            envelope = tok.read(PROTECTED_LABEL)
        errors = []

        def run(fn):
            try:
                for i in range(40):
                    fn(i)
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=run, args=(lambda i: errors.append("bad answer")
                                                       if not token_check(ref, table, i) else None,)),
                   threading.Thread(target=run, args=(lambda i: write_card(ref, envelope),))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with Token(ref) as tok:
            out = {"errors": errors, "objects": len(tok._objects(PROTECTED_LABEL)),
                   "same": tok.read(PROTECTED_LABEL) == envelope}
    """, table=str(home / "dongle-table"))
    assert result == {"errors": [], "objects": 1, "same": True}


# ---------------------------------------------------------------- the card's other services in dongle mode


def test_ssh_agent_in_dongle_mode(enrolled):
    """Smoke: the card daemon's ssh-agent serves a token-backed card: `ssh-add -L` lists the card's keys
    (the same lines as `vsc card ssh-pubkey`), and `ssh-keygen -Y sign` through the agent gives a signature
    `ssh-keygen -Y verify` accepts."""
    ssh_add = need_program("ssh-add")
    ssh_keygen = need_program("ssh-keygen")
    lab, home, _ = enrolled
    card = lab.card(home).start()
    sock = re.search(r"ssh-agent on (\S+);", card.wait_for("vsc-card: ssh-agent on "))
    assert sock, card.log()
    env = dict(lab.env(), SSH_AUTH_SOCK=sock.group(1))
    listed = subprocess.run([ssh_add, "-L"], env=env, capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    lines = sorted(listed.stdout.splitlines())
    assert len(lines) == 4 and all("vsc:dg-1:" in line for line in lines), lines
    assert lines == sorted(lab.vsc("card", "--home", str(home), "ssh-pubkey").stdout.splitlines())

    ecdsa = next(line for line in lines if line.startswith("ecdsa-sha2-nistp256"))
    pub = lab.root / "key.pub"
    pub.write_text(ecdsa + "\n")
    data = lab.root / "data"
    data.write_text("signed through the agent\n")
    signed = subprocess.run([ssh_keygen, "-Y", "sign", "-f", str(pub), "-n", "file", str(data)], env=env,
                            capture_output=True, text=True, timeout=30)
    assert signed.returncode == 0, signed.stderr
    allowed = lab.root / "allowed"
    allowed.write_text("owner " + " ".join(ecdsa.split()[:2]) + "\n")
    with open(data) as f:
        verified = subprocess.run([ssh_keygen, "-Y", "verify", "-f", str(allowed), "-I", "owner", "-n", "file",
                                   "-s", str(data) + ".sig"], stdin=f, capture_output=True, text=True, timeout=30)
    assert verified.returncode == 0, verified.stdout + verified.stderr


BINDING_PROBE = textwrap.dedent('''
    import sys
    from vsc import crypto
    from vsc.card import ops
    from vsc.card.protected import CardMemory
    from vsc.dongle.storage import bound_key, read_card
    from vsc.dongle.token import TokenRef
    from vsc.wire.ops import KdfParams
    uri, password = sys.argv[1], sys.argv[2]
    ref = TokenRef.parse(uri, "%s")
    envelope, kdf = read_card(ref)
    params = KdfParams.decode(kdf)
    keys = ops.derive_keys(password, params)
    try:
        CardMemory.load("x", envelope, keys.protection_key).wipe()
        print("opened with the password alone")
    except crypto.CryptoError:
        print("password alone: refused")
    CardMemory.load("x", envelope, bound_key(ref, keys.protection_key, params)).wipe()
    print("with the token: opened")
''' % PIN)


def test_the_card_on_the_token_needs_the_dongle_key_to_open(enrolled):
    """The token's copy of the card is wrapped under the password key mixed with the DongleKey's answer: the
    data objects and the password alone (what a copied token file or a fake PKCS#11 module could give) do not
    open it; with the token they do."""
    lab, home, table = enrolled
    token_line = [ln for ln in (home / "card.ini").read_text().splitlines() if ln.startswith("token = ")][0]
    uri = token_line.split(" = ", 1)[1]
    proc = subprocess.run([sys.executable, "-c", BINDING_PROBE, uri, PASSWORD], env=lab.env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["password alone: refused", "with the token: opened"]
