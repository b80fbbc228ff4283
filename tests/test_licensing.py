"""
Licence and copy protection ([0008], [0017], [0044]-[0045], [0064]-[0065],
claim 8): keyfiles, the card's proof of possession, rental counters, the
``vsc run`` ignition key and the ``vsc.licensing.lcp`` API for protected programs.

Three layers:

* keyfiles and proofs as plain functions (no processes);
* ``IgnitionKey`` on a fake reactor (``twisted.internet.task.Clock``), and
  once on the real reactor with a child that ignores SIGTERM;
* end to end: a real ``twistd vsc-server`` and ``twistd vsc-card`` on
  127.0.0.1, the real ``vsc`` command line, and a small protected Python
  program. One server and one enrolled card serve the whole module; tests
  that remove or kill the card put it back (``card`` fixture).

Every wait is bounded; every process started here is killed at teardown.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs
import pytest

from tests.integration import wait_for
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated, ReactorNotRunning
from twisted.internet.task import Clock

from tests.fakecard import FakeCardSocket, fake_home  # noqa: F401  (a fixture)
from tests.servers import TWISTD, VSC, Servers, _env, admin, init_data_dir
from vsc import crypto
from vsc.card import client
from vsc.licensing import lcp
from vsc.licensing.run import IgnitionKey
from vsc.wire import control
from vsc.wire.license import ARMOR_BEGIN, ARMOR_END, KeyfileSchema, License, armor, decode_body, dearmor, encode_body

CLI_TIMEOUT = 60.0
CARD_START_TIMEOUT = 30.0


# ================================================================ keyfiles and proofs


@pytest.fixture(scope="module")
def vendor():
    """A vendor signing key pair (private PEM, public PEM)."""
    return crypto.vendor_keygen()


@pytest.fixture(scope="module")
def card_key():
    """A customer card's P-256 key pair (private DER, public DER), as a card's slot 9c holds it."""
    der = crypto.generate_private_der("p256")
    return der, crypto.public_der_of(der)


def make_license(card_public: bytes, **changes) -> License:
    values = dict(product="editor", license_id=os.urandom(16), card_key=card_public, slot="9c",
                  issued=1_700_000_000, expires=0, runs=0, counter="", cost=1, features=("pro",), vendor="ACME")
    values.update(changes)
    return License(**values)


def card_sign(private_der: bytes, lic: License, nonce: bytes) -> bytes:
    """What the card daemon does for a proof: sign the SHA-256 digest of the challenge."""
    digest = hashlib.sha256(lcp.proof_challenge(lic, nonce)).digest()
    with crypto.PrivateKeyHandle(private_der) as key:
        return key.sign_digest(digest)


def test_keyfile_round_trip(vendor, card_key, tmp_path):
    """A keyfile issued by the vendor loads back (from text and from a file) as exactly the licence signed."""
    lic = make_license(card_key[1], expires=2_000_000_000, runs=5, features=("pro", "export"))
    text = lcp.issue(vendor[0], lic)
    assert text.startswith(ARMOR_BEGIN + "\n") and text.rstrip().endswith(ARMOR_END)
    assert lcp.loads(text, vendor[1]) == lic
    path = tmp_path / "app.keyfile"
    path.write_text(text)
    assert lcp.load(path, vendor[1]) == lic


def _refused_as_forged_or_malformed(text: str, vendor_public: bytes) -> str:
    with pytest.raises(lcp.LicenseError) as info:
        lcp.loads(text, vendor_public, "app.keyfile")
    msg = str(info.value)
    assert ("does not verify" in msg or "not valid base64" in msg or "not a vsc keyfile" in msg
            or msg.startswith("app.keyfile: keyfile:") or msg.startswith("app.keyfile: licence:")), msg
    return msg


def test_every_flipped_byte_of_a_keyfile_is_refused(vendor, card_key):
    """
    Flipping any single byte of the armored payload (every bit of it, and
    every base64 character) gives a keyfile that is refused as forged or
    malformed, never accepted and never an unexpected exception.
    """
    lic = make_license(card_key[1], runs=3)
    text = lcp.issue(vendor[0], lic)
    body, signature = dearmor(text)
    raw = KeyfileSchema.build(dict(body=body, signature=signature))
    forged = malformed = 0
    for i in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(raw)
            bad[i] ^= mask
            lines = base64.b64encode(bytes(bad)).decode()
            msg = _refused_as_forged_or_malformed(f"{ARMOR_BEGIN}\n{lines}\n{ARMOR_END}\n", vendor[1])
            if "does not verify" in msg:
                forged += 1
            else:
                malformed += 1
    assert forged > 2 * len(body) and malformed > 0  # body and signature bytes: forged; framing: malformed
    payload = "".join(text.strip().splitlines()[1:-1])
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    for i, ch in enumerate(payload):
        if ch == "=":
            continue
        other = alphabet[(alphabet.index(ch) + 1) % 64]
        _refused_as_forged_or_malformed(f"{ARMOR_BEGIN}\n{payload[:i]}{other}{payload[i + 1:]}\n{ARMOR_END}\n", vendor[1])
    for cut in (1, 4, len(payload) // 2):  # truncated payloads
        _refused_as_forged_or_malformed(f"{ARMOR_BEGIN}\n{payload[:-cut]}\n{ARMOR_END}\n", vendor[1])
    _refused_as_forged_or_malformed(text.replace(ARMOR_END, ""), vendor[1])


def test_an_edited_licence_with_the_old_signature_is_forged(vendor, card_key):
    """The user raising ``runs`` or dropping ``expires`` in the body breaks the vendor's signature."""
    lic = make_license(card_key[1], runs=1, expires=1_800_000_000)
    body, signature = dearmor(lcp.issue(vendor[0], lic))
    for change in (dict(runs=1000), dict(expires=0), dict(features=("pro", "enterprise"))):
        text = armor(encode_body(attrs.evolve(decode_body(body), **change)), signature)
        msg = _refused_as_forged_or_malformed(text, vendor[1])
        assert "does not verify" in msg


def test_wrong_vendor_key_is_refused(vendor, card_key, tmp_path):
    """A keyfile signed by another vendor (or by the user) does not verify; a non-Ed25519 key is not usable."""
    other_private, other_public = crypto.vendor_keygen()
    own = lcp.issue(other_private, make_license(card_key[1]))
    with pytest.raises(lcp.LicenseError, match="does not verify"):
        lcp.loads(own, vendor[1])
    genuine = lcp.issue(vendor[0], make_license(card_key[1]))
    with pytest.raises(lcp.LicenseError, match="does not verify"):
        lcp.loads(genuine, other_public)
    with pytest.raises(lcp.LicenseError, match="not usable"):
        lcp.loads(genuine, crypto.public_pem(card_key[1]))  # a P-256 key is not a vendor key
    with pytest.raises(lcp.LicenseError, match="cannot read the keyfile"):
        lcp.load(tmp_path / "missing.keyfile", vendor[1])


def test_expiry_with_an_injected_clock(card_key):
    """A licence is valid strictly before ``expires``; 0 means it never expires."""
    lic = make_license(card_key[1], expires=1_900_000_000)
    lcp.check_limits(lic, now=1_899_999_999.9)
    for now in (1_900_000_000, 1_900_000_001, 4_000_000_000):
        with pytest.raises(lcp.LicenseError, match="expired"):
            lcp.check_limits(lic, now=now)
    lcp.check_limits(make_license(card_key[1], expires=0), now=4_000_000_000)


def test_feature_and_product_requirements(card_key):
    """A required feature must be in the keyfile (try-before-buy tiers); a keyfile unlocks only its product."""
    lic = make_license(card_key[1], features=("basic",))
    lcp.check_limits(lic, now=0, feature="basic", product="editor")
    with pytest.raises(lcp.LicenseError, match="does not include the feature 'pro'"):
        lcp.check_limits(lic, now=0, feature="pro")
    with pytest.raises(lcp.LicenseError, match="is for 'editor', not 'compiler'"):
        lcp.check_limits(lic, now=0, product="compiler")


def test_proof_verifies_only_with_the_licensed_card_key(card_key):
    """The card's signature over a fresh challenge verifies with the keyfile's key; another key, nonce or licence fails."""
    lic = make_license(card_key[1])
    nonce = os.urandom(32)
    good = card_sign(card_key[0], lic, nonce)
    assert lcp.verify_proof(lic, nonce, good)
    other = crypto.generate_private_der("p256")
    assert not lcp.verify_proof(lic, nonce, card_sign(other, lic, nonce))
    assert not lcp.verify_proof(lic, os.urandom(32), good)  # a replayed proof for another nonce
    assert not lcp.verify_proof(make_license(card_key[1]), nonce, good)  # another grant's challenge
    assert not lcp.verify_proof(lic, nonce, b"")
    assert not lcp.verify_proof(lic, nonce, b"\x30\x00" + good)
    rsa = crypto.generate_private_der("rsa2048")  # an RSA slot (9a/9d) proves the same way
    rsa_lic = make_license(crypto.public_der_of(rsa), slot="9a")
    assert lcp.verify_proof(rsa_lic, nonce, card_sign(rsa, rsa_lic, nonce))
    assert not lcp.verify_proof(attrs.evolve(lic, card_key=b"not a key"), nonce, good)


def test_counter_name_per_grant_or_explicit(card_key, vendor):
    """
    A rental grant gets its own ``lic:`` counter (so each grant funds once);
    ``--counter`` names one explicitly; either is qualified by the vendor key,
    so a keyfile signed with another key can never touch the real vendor's counter.
    """
    pub = vendor[1]
    other_pub = crypto.vendor_keygen()[1]
    tag = crypto.sha256(crypto.vendor_public_der(pub)).hex()[:12]
    a = make_license(card_key[1], runs=3)
    b = make_license(card_key[1], runs=3)
    assert lcp.counter_name(a, pub) == f"lic:editor:{a.license_id.hex()[:16]}:{tag}"
    assert lcp.counter_name(a, pub) != lcp.counter_name(b, pub)
    assert lcp.counter_name(a, pub) != lcp.counter_name(a, other_pub)
    assert lcp.counter_name(make_license(card_key[1], counter="lic:editor-pool"), pub) == f"lic:editor-pool:{tag}"
    assert lcp.is_rental(a) and lcp.is_rental(make_license(card_key[1], counter="lic:x"))
    assert not lcp.is_rental(make_license(card_key[1]))


def test_no_runs_left_maps_counter_refusals(card_key):
    """A counter that would go below zero (or does not exist) is reported as "no runs left"; other refusals are not."""
    lic = make_license(card_key[1], runs=2)
    assert "no runs left" in str(lcp.no_runs_left(lic, "counter 'lic:x' is 0; it cannot go below zero"))
    assert "no runs left" in str(lcp.no_runs_left(lic, "no counter 'lic:x'"))
    assert lcp.no_runs_left(lic, "the card is not inserted") is None


def test_issue_refuses_what_would_not_protect(vendor, card_key, tmp_path, capsys):
    """``vsc license issue`` refuses a non-``lic:`` counter, zero runs, zero cost and oversize fields with one line."""
    from vsc import cli

    (tmp_path / "v.key").write_bytes(vendor[0])
    (tmp_path / "card.pem").write_bytes(crypto.public_pem(card_key[1]))
    base = ["license", "issue", "--slot", "9c", "--vendor-key", str(tmp_path / "v.key"), "--card-key", str(tmp_path / "card.pem"),
            "--out", str(tmp_path / "k")]
    for extra, text in ((["--product", "p", "--counter", "credits"], "must start with 'lic:'"),
                        (["--product", "p", "--runs", "0"], "--runs must be at least 1"),
                        (["--product", "p", "--runs", "3", "--cost", "0"], "--cost must be at least 1"),
                        (["--product", "p" * 200], "cannot issue this keyfile")):
        assert cli.main(base + extra) == 1
        err = capsys.readouterr().err
        assert text in err and err.count("\n") == 1, err
    assert not (tmp_path / "k").exists()
    assert cli.main(base + ["--product", "p", "--runs", "2", "--counter", "lic:pool"]) == 0


def test_api_check_verifies_the_proof_itself(vendor, card_key, fake_home, tmp_path):
    """
    ``lcp.check`` talks AMP to the control socket without a reactor and
    trusts nothing but the signature: the right card key passes, another
    card's signature, a card error and a silent daemon are refused, and no
    daemon at all means "no card is inserted".
    """
    keyfile = tmp_path / "app.keyfile"
    lic = make_license(card_key[1], features=("pro",))
    keyfile.write_text(lcp.issue(vendor[0], lic))
    signer = {"key": card_key[0]}

    def respond(command, args):
        if signer["key"] == "silent":
            return None
        if signer["key"] == "error":
            return {b"_error_code": b"CARD_ERROR", b"_error_description": b"no key in slot 9c"}
        with crypto.PrivateKeyHandle(signer["key"]) as key:
            return {b"signature": key.sign_digest(args[b"digest"])}

    with pytest.raises(lcp.LicenseError, match=r"^no card is inserted \(no card daemon for "):
        lcp.check(str(keyfile), vendor[1], home=fake_home)
    card = FakeCardSocket(fake_home, respond)
    try:
        assert lcp.check(str(keyfile), vendor[1], home=fake_home, product="editor", feature="pro") == lic
        assert card.requests[-1][0] == b"SignDigest" and card.requests[-1][1][b"slot"] == b"9c"
        nonces = {args[b"digest"] for _, args in card.requests}
        lcp.check(str(keyfile), vendor[1], home=fake_home)
        assert len({args[b"digest"] for _, args in card.requests}) == len(nonces) + 1  # a fresh challenge each time
        signer["key"] = crypto.generate_private_der("p256")
        with pytest.raises(lcp.LicenseError, match="does not hold the key this licence was issued to"):
            lcp.check(str(keyfile), vendor[1], home=fake_home)
        signer["key"] = "error"
        with pytest.raises(lcp.LicenseError, match="^the card refused: no key in slot 9c$"):
            lcp.check(str(keyfile), vendor[1], home=fake_home)
        signer["key"] = "silent"
        with pytest.raises(lcp.LicenseError, match="did not answer in time"):
            lcp.check(str(keyfile), vendor[1], home=fake_home, timeout=0.5)
    finally:
        card.close()


def test_api_check_on_a_fixed_clock_and_randomness(vendor, card_key, fake_home, tmp_path):
    """
    ``lcp.check`` takes its time and its nonces from the caller: a keyfile
    that expired long ago passes at ``now`` just before its expiry and is
    refused at ``now`` = expiry (the wall clock plays no part), and the digest
    the card is asked to sign is exactly SHA-256 of the challenge over the
    nonce ``rand`` returned.
    """
    expires = 1_000_000_000  # 2001: long past on the wall clock
    lic = make_license(card_key[1], expires=expires)
    keyfile = tmp_path / "old.keyfile"
    keyfile.write_text(lcp.issue(vendor[0], lic))
    nonce = bytes(range(32))
    asked: list[int] = []

    def rand(n: int) -> bytes:
        asked.append(n)
        return nonce

    def respond(command, args):
        with crypto.PrivateKeyHandle(card_key[0]) as key:
            return {b"signature": key.sign_digest(args[b"digest"])}

    card = FakeCardSocket(fake_home, respond)
    try:
        assert lcp.check(str(keyfile), vendor[1], home=fake_home, now=expires - 1, rand=rand) == lic
        assert asked == [32]
        assert card.requests[-1][1][b"digest"] == hashlib.sha256(lcp.proof_challenge(lic, nonce)).digest()
        with pytest.raises(lcp.LicenseError, match="^the licence for editor expired$"):
            lcp.check(str(keyfile), vendor[1], home=fake_home, now=expires, rand=rand)
        assert len(card.requests) == 1  # refused before the card was asked
    finally:
        card.close()


def test_guard_checks_expiry_on_its_clock(vendor, card_key, fake_home, tmp_path):
    """A Guard whose clock reads past the keyfile's expiry calls on_failure once, with the expiry reason."""
    lic = make_license(card_key[1], expires=2_000_000_000)
    keyfile = tmp_path / "g.keyfile"
    keyfile.write_text(lcp.issue(vendor[0], lic))
    failures: list[str] = []
    guard = lcp.Guard(str(keyfile), vendor[1], interval=0.01, home=fake_home, on_failure=failures.append,
                      clock=lambda: 2_000_000_000.0)
    guard.start()
    guard._thread.join(10)
    assert not guard._thread.is_alive() and failures == ["the licence for editor expired"]


def test_documented_counter_names_have_the_codes_form(vendor, card_key):
    """
    Every rental counter name in docs/licensing.md has the form the code
    makes (``lic:PRODUCT:<16 hex>:<12 hex vendor tag>``), the page states that
    form, and ``counter_name`` makes names of it from the licence id and the
    vendor key's SHA-256 (issue 13: the page once named them without the tag).
    """
    doc = (Path(__file__).resolve().parent.parent / "docs" / "licensing.md").read_text()
    form = re.compile(r"lic:[a-z0-9-]+:[0-9a-f]{16}:[0-9a-f]{12}")
    names = re.findall(r"lic:[A-Za-z0-9:.-]*[0-9a-f]{8}[0-9a-f:]*", doc)
    assert names and all(form.fullmatch(n) for n in names), names
    assert "`lic:PRODUCT:<first 16 hex digits of the licence id>:<vendor tag>`" in doc
    lic = make_license(card_key[1], runs=2)
    name = lcp.counter_name(lic, vendor[1])
    assert form.fullmatch(name)
    tag = hashlib.sha256(crypto.vendor_public_der(vendor[1])).hexdigest()[:12]
    assert name == f"lic:editor:{lic.license_id.hex()[:16]}:{tag}"


# ================================================================ IgnitionKey on a fake reactor


class FakeProcess:
    def __init__(self, key: IgnitionKey):
        self.key = key
        self.pid: int | None = 4242
        self.signals: list[int] = []

    def signalProcess(self, sig) -> None:
        if self.pid is None:
            raise ProcessExitedAlready()
        self.signals.append(sig)

    def exit(self, code: int = 0, sig: int | None = None) -> None:
        """End the way Twisted reports it: ProcessDone, or ProcessTerminated with a code or a signal."""
        self.pid = None
        if sig:
            self.key.ended(ProcessTerminated(None, sig))
        else:
            self.key.ended(ProcessTerminated(code) if code else ProcessDone(0))


class FakeReactor(Clock):
    """A Clock with the reactor methods IgnitionKey uses: spawnProcess, stop, system event triggers."""

    def __init__(self):
        super().__init__()
        self.running = True
        self.events: list[str] = []
        self.spawned: list[tuple[str, list]] = []
        self.process: FakeProcess | None = None
        self.triggers: list = []
        self.key: IgnitionKey | None = None

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        self.events.append("spawn")
        self.spawned.append((executable, list(args)))
        self.process = FakeProcess(self.key)
        return self.process

    def stop(self) -> None:
        if not self.running:
            raise ReactorNotRunning()
        self.running = False
        self.events.append("stop")

    def addSystemEventTrigger(self, phase, event, fn, *a):
        self.triggers.append((phase, event, fn))


class Steps:
    """prove/charge stand-ins whose Deferreds the test fires by hand (or at once)."""

    def __init__(self, reactor: FakeReactor, prove_ok: bool = True, charge_ok: bool = True, manual: bool = False):
        self.reactor = reactor
        self.prove_ok = prove_ok
        self.charge_ok = charge_ok
        self.manual = manual
        self.pending: list[defer.Deferred] = []

    def _step(self, name: str, ok: bool, value=None):
        self.reactor.events.append(name)
        d = defer.Deferred()
        if self.manual:
            self.pending.append(d)
        elif ok:
            d.callback(value)
        else:
            d.errback(lcp.LicenseError(f"{name} refused"))
        return d

    async def prove(self, reactor, home, lic):
        return await self._step("prove", self.prove_ok)

    async def charge(self, reactor, home, lic):
        return await self._step("charge", self.charge_ok, 2)


def ignition(lic: License, steps_kw: dict | None = None, **kw):
    reactor = FakeReactor()
    steps = Steps(reactor, **(steps_kw or {}))
    key = IgnitionKey(reactor, Path("/nonexistent"), lic, ["prog", "--flag"], interval=kw.pop("interval", 5.0),
                      grace=kw.pop("grace", 2.0), prove=steps.prove, charge=steps.charge,
                      spawn_argv=lambda program: (program[0], program), **kw)
    reactor.key = key
    return reactor, steps, key


@pytest.fixture(scope="module")
def rental(card_key):
    return make_license(card_key[1], runs=3)


@pytest.fixture(scope="module")
def perpetual(card_key):
    return make_license(card_key[1])


def test_ignition_starts_the_program_only_after_prove_and_charge(rental):
    """The program is spawned only once the proof AND the rental charge have both succeeded, in that order."""
    reactor, steps, key = ignition(rental, {"manual": True})
    key.start()
    assert reactor.events == ["prove"]
    steps.pending.pop(0).callback(None)
    assert reactor.events == ["prove", "charge"]  # proved, not yet paid: still not started
    steps.pending.pop(0).callback(2)
    assert reactor.events == ["prove", "charge", "spawn"]
    assert reactor.spawned == [("prog", ["prog", "--flag"])]
    assert key.started and reactor.running


def test_ignition_perpetual_licence_is_never_charged(perpetual):
    """A keyfile without runs or counter proves and starts without touching a counter."""
    reactor, steps, key = ignition(perpetual)
    key.start()
    assert reactor.events == ["prove", "spawn"]


@pytest.mark.parametrize("failing", ["prove", "charge"])
def test_ignition_refusal_never_starts_the_program(rental, failing):
    """A failed proof or charge exits 75 with the reason, and the program is never spawned."""
    reactor, steps, key = ignition(rental, {f"{failing}_ok": False})
    key.start()
    assert "spawn" not in reactor.events and reactor.spawned == []
    assert key.exit_code == lcp.EXIT_LICENSE and key.refusal == f"{failing} refused"
    assert reactor.events[-1] == "stop"


def test_ignition_unanswered_first_proof_times_out(perpetual):
    """A card daemon that never answers the first proof: refused after answer_timeout, nothing started."""
    reactor, steps, key = ignition(perpetual, {"manual": True}, answer_timeout=3.0)
    key.start()
    reactor.advance(2.9)
    assert key.exit_code == 0 and reactor.running
    reactor.advance(0.2)
    assert reactor.spawned == [] and key.exit_code == lcp.EXIT_LICENSE
    assert key.refusal == "the card did not answer in time"


def test_ignition_failed_reprove_sends_sigterm_then_sigkill_after_grace(perpetual):
    """A failing re-proof sends SIGTERM at once, SIGKILL after ``grace``; the exit code is then 75."""
    reactor, steps, key = ignition(perpetual, interval=5.0, grace=2.0)
    key.start()
    proc = reactor.process
    reactor.advance(5.0)
    reactor.advance(5.0)
    assert reactor.events.count("prove") == 3 and proc.signals == []  # initial + two good re-proofs
    steps.prove_ok = False
    reactor.advance(5.0)
    assert proc.signals == [signal.SIGTERM]
    assert key.refusal == "stopping prog: prove refused"
    reactor.advance(1.9)
    assert proc.signals == [signal.SIGTERM]
    reactor.advance(0.1)
    assert proc.signals == [signal.SIGTERM, signal.SIGKILL]
    proc.exit(sig=signal.SIGKILL)
    assert key.exit_code == lcp.EXIT_LICENSE and not reactor.running
    reactor.advance(60)
    assert reactor.events.count("prove") == 4  # the loop stopped with the program


def test_ignition_program_that_honours_sigterm_gets_no_sigkill(perpetual):
    """A program ending within the grace period after SIGTERM is not SIGKILLed (and nothing raises)."""
    reactor, steps, key = ignition(perpetual, interval=1.0, grace=2.0)
    key.start()
    steps.prove_ok = False
    reactor.advance(1.0)
    reactor.process.exit(sig=signal.SIGTERM)
    reactor.advance(5.0)
    assert reactor.process.signals == [signal.SIGTERM] and key.exit_code == lcp.EXIT_LICENSE


def test_ignition_hanging_reprove_counts_as_a_removed_card(perpetual):
    """A re-proof that never answers (card daemon stopped, SIGSTOP) stops the program after answer_timeout."""
    reactor, steps, key = ignition(perpetual, interval=1.0, grace=1.0, answer_timeout=3.0)
    key.start()
    steps.manual = True
    reactor.advance(1.0)
    reactor.advance(2.0)
    assert reactor.process.signals == []
    reactor.advance(1.0)
    assert reactor.process.signals == [signal.SIGTERM]
    assert key.refusal == "stopping prog: the card stopped answering"


def test_ignition_passes_the_program_exit_status_through(perpetual):
    """While the licence holds, ``vsc run`` exits with the program's own status (128+N for a signal)."""
    for code, sig, expected in ((0, None, 0), (3, None, 3), (0, signal.SIGSEGV, 128 + signal.SIGSEGV)):
        reactor, steps, key = ignition(perpetual)
        key.start()
        reactor.process.exit(code, sig)
        assert key.exit_code == expected and not reactor.running and key.refusal == ""


def test_ignition_stopping_vsc_run_stops_the_program_first(perpetual):
    """SIGTERM/Ctrl-C to ``vsc run``: a before-shutdown trigger terminates the program and waits for it."""
    reactor, steps, key = ignition(perpetual, grace=2.0)
    key.start()
    (phase, event, fn), = reactor.triggers
    assert (phase, event) == ("before", "shutdown")
    reactor.running = True
    done = fn()
    assert reactor.process.signals == [signal.SIGTERM] and not done.called
    reactor.advance(2.0)
    assert reactor.process.signals == [signal.SIGTERM, signal.SIGKILL]
    reactor.process.exit(sig=signal.SIGKILL)
    assert done.called


class RealReactorForKey:
    """The real reactor for an IgnitionKey, except that stopping it only records the wish (pytest owns it)."""

    def __init__(self, reactor):
        self._reactor = reactor
        self.stopped = defer.Deferred()
        self.running = True

    def stop(self):
        if not self.stopped.called:
            self.stopped.callback(None)

    def addSystemEventTrigger(self, *a, **kw):
        return None  # not on the test runner's reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)


@pytest_twisted.ensureDeferred
async def test_ignition_real_reactor_kills_a_child_that_ignores_sigterm(tmp_path):
    """
    Real reactor, real child that ignores SIGTERM (``trap "" TERM``): the
    failing re-proof sends SIGTERM, nothing happens, SIGKILL follows after
    the grace period and the child dies of it. Bounded to a few seconds.
    """
    from twisted.internet import reactor as real

    proxy = RealReactorForKey(real)
    pidfile = tmp_path / "pid"
    results = {"ok": True}

    async def prove(reactor, home, lic):
        if not results["ok"]:
            raise lcp.LicenseError("the card was removed")

    async def charge(reactor, home, lic):
        raise AssertionError("not a rental")

    lic = make_license(crypto.public_der_of(crypto.generate_private_der("p256")))
    program = ["sh", "-c", f'trap "" TERM; echo $$ > {pidfile}; exec sleep 30']
    key = IgnitionKey(proxy, tmp_path, lic, program, interval=0.2, grace=0.7, prove=prove, charge=charge)
    ended: list = []
    original_ended = key.ended
    key.ended = lambda value: (ended.append((time.monotonic(), value)), original_ended(value))
    key.start()
    for _ in range(500):  # the program's pid file, polled (the event asserted, not how soon it came)
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await _sleep(real, 0.02)
    assert pidfile.exists() and pidfile.read_text().strip(), "the program did not start"
    pid = int(pidfile.read_text())
    assert pid == key.process.pid  # the launcher's wrapper exec'd the program in the same process
    await _sleep(real, 0.5)  # a few good re-proofs
    assert not ended
    failed_at = time.monotonic()
    results["ok"] = False
    await _with_timeout(real, proxy.stopped, 5.0)
    when, value = ended[0]
    assert getattr(value, "signal", None) == signal.SIGKILL  # SIGTERM was ignored
    assert when - failed_at >= 0.7  # not before the grace period (how much later is a figure, not a test)
    assert key.exit_code == lcp.EXIT_LICENSE and "the card was removed" in key.refusal


async def _sleep(reactor, seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)


async def _with_timeout(reactor, d: defer.Deferred, seconds: float):
    d.addTimeout(seconds, reactor)
    return await d


# ================================================================ end to end: server, card daemon, vsc CLI


def _pid_alive(pid: int) -> bool:
    """Running (a zombie, waiting for a parent that may never reap it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")




class CardDaemon:
    """``twistd -n vsc-card --home HOME`` (the inserted card), output appended to a log."""

    def __init__(self, world: "World"):
        self.world = world
        self.proc: subprocess.Popen | None = None
        self.log_path = world.root / "card.log"
        self.starts = 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def start(self) -> None:
        assert not self.running()
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts} =====\n".encode())
            offset = log.tell()
            self.proc = subprocess.Popen(
                [str(TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.world.home),
                 "--password-file", str(self.world.password_file)],
                cwd=self.world.root, env=self.world.env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )

        def inserted():
            if self.proc.poll() is not None:
                raise AssertionError(f"vsc-card exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            return "inserted; control socket" in self.log_text()[offset:]

        wait_for(inserted, CARD_START_TIMEOUT, "the card to be inserted", 0.05)

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.running():
            self.proc.terminate()  # SIGTERM removes the card, then exits
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@attrs.define
class World:
    root: Path
    runtime: Path
    env: dict
    home: Path
    password_file: Path
    vendor_key: Path
    vendor_pub: Path
    card_pem: Path
    servers: Servers
    card: CardDaemon | None = None
    killed: bool = False  # the card daemon was killed -9 (the card is still "in use" on the server)

    def vsc(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VSC), *args], env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"vsc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def issue(self, name: str, *options: str, product: str = "editor", vendor_key: Path | None = None,
              card_pem: Path | None = None) -> Path:
        out = self.root / name
        self.vsc("license", "issue", "--slot", "9c", "--vendor-key", str(vendor_key or self.vendor_key), "--product", product,
                 "--card-key", str(card_pem or self.card_pem), "--out", str(out), *options)
        return out

    def run_args(self, keyfile: Path, *program: str, options: tuple = ()) -> list[str]:
        return [str(VSC), "run", "--home", str(self.home), "--license", str(keyfile),
                "--vendor-key", str(self.vendor_pub), *options, "--", *program]

    def run(self, keyfile: Path, *program: str, options: tuple = (), timeout: float = CLI_TIMEOUT):
        return subprocess.run(self.run_args(keyfile, *program, options=options), env=self.env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def counter(self, name: str) -> int:
        """`vsc card counter NAME`: what the user sees."""
        return json.loads(self.vsc("card", "--home", str(self.home), "counter", name, "--json").stdout)["value"]

    def peek(self, name: str) -> int:
        """The same read, straight over the control socket (no CLI start-up)."""
        return client.call(self.home, control.COUNTER, 10, name=name, delta=0)["value"]

    def ensure_card(self) -> None:
        """The card is inserted: recover it first if its daemon was killed -9."""
        if self.card.running():
            return
        if self.killed:
            self.vsc("card", "--home", str(self.home), "recover", "--password-file", str(self.password_file))
            self.killed = False
        self.card.start()

    def remove_card(self) -> None:
        self.vsc("card", "--home", str(self.home), "remove")
        self.card.wait_exit()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One VSC Server and one enrolled card "carol" (plus a vendor key pair) for the end-to-end tests."""
    root = tmp_path_factory.mktemp("licensing")
    runtime = Path(tempfile.mkdtemp(prefix="vsclic-", dir="/tmp"))  # short: UNIX socket paths are limited
    env = dict(_env(), VSC_LOCK_DIR=str(root / "lock"), XDG_RUNTIME_DIR=str(runtime))
    servers = Servers(root / "logs")
    w = None
    try:
        data = root / "srv"
        info = init_data_dir(data)
        server = servers.start(data, "server")
        code = admin(data, "issue", "carol")["code"]
        (root / "pw").write_text("carol's password\n")
        w = World(root=root, runtime=runtime, env=env, home=root / "home", password_file=root / "pw",
                  vendor_key=root / "vendor.key", vendor_pub=root / "vendor.pub", card_pem=root / "card.pem",
                  servers=servers)
        w.vsc("card", "--home", str(w.home), "enroll", "--server", server.endpoint, "--server-key",
              info["fingerprint"], "--serial", "carol", "--code", code, "--password-file", str(w.password_file),
              "--scrypt-log2n", "12", "--pin-policy", "9c=once")  # the licence key is 9C, used without a PIN
        w.card = CardDaemon(w)
        w.card.start()
        w.card_pem.write_text(w.vsc("card", "--home", str(w.home), "public-key", "--slot", "9c").stdout)
        w.vsc("license", "keygen", "--private", str(w.vendor_key), "--public", str(w.vendor_pub))
        yield w
    finally:
        if w is not None and w.card is not None:
            w.card.stop()
        servers.close()
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.fixture
def card(world, monkeypatch):
    """
    The card is inserted (started again, after a recover if needed, when an
    earlier test removed or killed it); this process finds its control socket too.
    """
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(world.runtime))
    world.ensure_card()
    return world


# the card goes away in steps (remove answered, socket closed, daemon gone): any of these lines is right
# the card gone, or going: no daemon, the connection closed, or the daemon refusing while it removes the card
NO_CARD = r"no card is inserted|the card is not inserted|the card daemon closed|the card refused: the card is"


def marker_program(marker: Path, *then: str) -> tuple[str, ...]:
    """A program that proves it ran by creating ``marker`` (then runs ``then``, if given)."""
    rest = f"; exec {' '.join(then)}" if then else ""
    return ("sh", "-c", f"echo $$ > {marker}{rest}")


def assert_refused(proc: subprocess.CompletedProcess, marker: Path, reason: str) -> None:
    """Exit 75 with exactly one ``vsc: ...`` line naming ``reason``; the program never ran."""
    assert proc.returncode == lcp.EXIT_LICENSE, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vsc: "), proc.stderr
    assert re.search(reason, lines[0]), lines[0]
    assert not marker.exists(), "the program was started"
    assert proc.stdout == ""


@pytest.mark.integration
def test_run_starts_the_program_with_a_valid_keyfile(card):
    """`vsc license show/check` accept the keyfile and `vsc run` starts the program, passing its exit status on."""
    keyfile = card.issue("valid.key", "--expires", "2999-12-31", "--features", "pro,export")
    shown = json.loads(card.vsc("license", "show", "--license", str(keyfile), "--vendor-key", str(card.vendor_pub),
                                "--json").stdout)
    assert shown["product"] == "editor" and shown["features"] == ["pro", "export"] and shown["valid"]
    assert shown["card_key_sha256"] == hashlib.sha256(crypto.public_der_from_pem(card.card_pem.read_bytes())).hexdigest()
    checked = card.vsc("license", "check", "--home", str(card.home), "--license", str(keyfile),
                       "--vendor-key", str(card.vendor_pub), "--feature", "pro")
    assert "valid, card present" in checked.stdout
    marker = card.root / "ran-valid"
    proc = card.run(keyfile, *marker_program(marker, "echo", "hello from the program"), options=("--feature", "pro"))
    assert proc.returncode == 0, proc.stderr
    assert marker.exists() and proc.stdout == "hello from the program\n"
    proc = card.run(keyfile, "sh", "-c", "exit 3")
    assert proc.returncode == 3


@pytest.mark.integration
def test_run_refuses_a_keyfile_for_another_card(card):
    """A keyfile bound to another card's public key: the inserted card cannot prove it; exit 75, not started."""
    other = crypto.public_der_of(crypto.generate_private_der("p256"))
    pem = card.root / "other-card.pem"
    pem.write_bytes(crypto.public_pem(other))
    keyfile = card.issue("other-card.key", card_pem=pem)
    marker = card.root / "ran-other-card"
    assert_refused(card.run(keyfile, *marker_program(marker)), marker,
                   "the inserted card does not hold the key this licence was issued to")


@pytest.mark.integration
def test_run_refuses_forged_keyfiles(card):
    """A keyfile signed with the user's own vendor key, or a genuine one edited, does not verify; exit 75."""
    fake_key, fake_pub = card.root / "fake-vendor.key", card.root / "fake-vendor.pub"
    card.vsc("license", "keygen", "--private", str(fake_key), "--public", str(fake_pub))
    own = card.issue("self-signed.key", "--features", "pro", vendor_key=fake_key)
    marker = card.root / "ran-forged"
    assert_refused(card.run(own, *marker_program(marker)), marker, "signature does not verify")
    genuine = card.issue("genuine-rental.key", "--runs", "1")
    body, signature = dearmor(genuine.read_text())
    edited = card.root / "edited.key"
    edited.write_text(armor(encode_body(attrs.evolve(decode_body(body), runs=1000)), signature))
    assert_refused(card.run(edited, *marker_program(marker)), marker, "signature does not verify")
    garbage = card.root / "garbage.key"
    garbage.write_text("hello\n")
    assert_refused(card.run(garbage, *marker_program(marker)), marker, "not a vsc keyfile")


@pytest.mark.integration
def test_run_refuses_an_expired_keyfile(card):
    """An expired keyfile: refused before the card is asked; `show` still prints it but exits 75."""
    keyfile = card.issue("expired.key", "--expires", "2001-01-01")
    marker = card.root / "ran-expired"
    assert_refused(card.run(keyfile, *marker_program(marker)), marker, "the licence for editor expired")
    shown = card.vsc("license", "show", "--license", str(keyfile), "--vendor-key", str(card.vendor_pub), check=False)
    assert shown.returncode == lcp.EXIT_LICENSE and "expires: 978307200" in shown.stdout


@pytest.mark.integration
def test_run_refuses_a_missing_feature(card):
    """`--feature pro` with a keyfile that grants only "basic" (a try-before-buy demo): exit 75."""
    keyfile = card.issue("demo.key", "--features", "basic")
    marker = card.root / "ran-feature"
    assert_refused(card.run(keyfile, *marker_program(marker), options=("--feature", "pro")), marker,
                   "does not include the feature 'pro'")
    proc = card.run(keyfile, *marker_program(marker), options=("--feature", "basic"))
    assert proc.returncode == 0 and marker.exists()


@pytest.mark.integration
def test_run_stops_the_program_after_card_remove_and_refuses_without_a_card(card, record_property):
    """
    `vsc card remove` while the program runs: the program (which ignores
    SIGTERM) is gone within interval + grace + 1 s, `vsc run` exits 75 with
    one line; afterwards, with no card inserted, `vsc run` refuses.
    """
    interval, grace = 1.0, 1.0
    keyfile = card.issue("perpetual.key")
    pidfile = card.root / "remove.pid"
    program = ("sh", "-c", f'trap "" TERM; echo $$ > {pidfile}; exec sleep 30')
    proc = subprocess.Popen(card.run_args(keyfile, *program, options=("--interval", str(interval), "--grace", str(grace))),
                            env=card.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=card.root)
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the program to start"))
        time.sleep(interval * 1.5)
        assert _pid_alive(pid) and proc.poll() is None  # re-proofs succeed while the card is in
        card.vsc("card", "--home", str(card.home), "remove")
        removed = time.monotonic()
        wait_for(lambda: not _pid_alive(pid), interval + grace + 1.0, "the program to be stopped")
        latency = time.monotonic() - removed
        record_property("kill_latency_after_remove_s", round(latency, 3))
        print(f"program gone {latency:.2f} s after `vsc card remove` (interval {interval}, grace {grace})")
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == lcp.EXIT_LICENSE
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.match(rf"vsc: stopping sh: ({NO_CARD})", lines[0]), err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    card.card.wait_exit()
    marker = card.root / "ran-no-card"
    assert_refused(card.run(keyfile, *marker_program(marker)), marker, "no card is inserted")


@pytest.mark.integration
def test_rental_counter_survives_kills_and_restarts(card):
    """
    A --runs 3 keyfile: a normal run, then a run whose `vsc run` is killed -9
    right after the program started (the unit is NOT handed back, and the
    program dies with its launcher); kill -9 the card daemon, `vsc card
    recover`, insert again: 1 run left; one more run → 0; the next run is
    refused, and the user can neither fund the counter nor get the grant
    to fund it again.
    """
    keyfile = card.issue("rental.key", "--runs", "3")
    name = json.loads(card.vsc("license", "show", "--license", str(keyfile), "--vendor-key", str(card.vendor_pub),
                               "--json").stdout)["counter"]
    assert name.startswith("lic:editor:")
    marker = card.root / "rental-1"
    assert card.run(keyfile, *marker_program(marker)).returncode == 0 and marker.exists()
    assert card.peek(name) == 2

    # run 2: kill -9 `vsc run` as soon as the program runs
    pidfile = card.root / "rental-2.pid"
    proc = subprocess.Popen(card.run_args(keyfile, "sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"), env=card.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, cwd=card.root)
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "the program to start"))
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not _pid_alive(pid), 5, "the program to die with its launcher")
    assert card.peek(name) == 1  # charged before the program started: the kill handed nothing back

    # kill -9 the card daemon: the card stays "in use" on the server until recovered
    card.card.kill9()
    card.killed = True
    gone = card.vsc("card", "--home", str(card.home), "counter", name, check=False)
    assert gone.returncode != 0
    card.ensure_card()  # vsc card recover, then insert again
    assert card.counter(name) == 1

    marker = card.root / "rental-3"
    assert card.run(keyfile, *marker_program(marker)).returncode == 0 and marker.exists()
    assert card.peek(name) == 0
    marker = card.root / "rental-4"
    assert_refused(card.run(keyfile, *marker_program(marker)), marker, rf"no runs left on the licence for editor \(counter {name}\)")

    funded = card.vsc("card", "--home", str(card.home), "counter", name, "--add", "5", check=False)
    assert funded.returncode != 0 and "funded by keyfiles only" in funded.stderr
    with pytest.raises(client.Refused):  # a raw control-socket request cannot step it up either
        client.call(card.home, control.COUNTER, 10, name=name, delta=5)
    again = client.call(card.home, control.LICENSE_FUND, 10, keyfile=keyfile.read_text(),
                        vendor_key=card.vendor_pub.read_bytes())
    assert again["value"] == 0 and again["name"] == name  # a grant funds its counter once: no refill
    assert card.counter(name) == 0
    check = card.vsc("license", "check", "--home", str(card.home), "--license", str(keyfile), "--vendor-key",
                     str(card.vendor_pub), "--charge", check=False)
    assert check.returncode == lcp.EXIT_LICENSE and "no runs left" in check.stderr


@pytest.mark.integration
def test_user_cannot_fund_a_licence_counter(card):
    """`vsc card counter lic:... --add 5` is refused for new and existing licence counters alike."""
    name = "lic:editor:0000000000000000"
    proc = card.vsc("card", "--home", str(card.home), "counter", name, "--add", "5", check=False)
    assert proc.returncode == 1 and "licence counters are funded by keyfiles only" in proc.stderr
    with pytest.raises(client.Refused, match="no counter"):
        card.peek(name)
    with pytest.raises(client.Refused, match="funded by keyfiles only"):
        client.call(card.home, control.COUNTER, 10, name="lic:anything", delta=1)


@pytest.mark.integration
def test_a_grant_counter_cannot_be_prefunded_by_hand(card, tmp_path):
    """
    The card funds a rental counter only from a keyfile whose vendor signature
    verifies and that names its own key: a forged grant (signed with the
    user's own vendor key) cannot fund the real vendor's counter, and a
    keyfile for another card is refused.
    """
    keyfile = card.issue("prefund.key", "--runs", "1")
    lic = lcp.load(keyfile, card.vendor_pub.read_bytes())
    real_name = lcp.counter_name(lic, card.vendor_pub.read_bytes())
    # the user's own vendor key signs a 1000-run copy of the grant
    my_key, my_pub = crypto.vendor_keygen()
    forged = lcp.issue(my_key, attrs.evolve(lic, runs=1000))
    resp = client.call(card.home, control.LICENSE_FUND, 10, keyfile=forged, vendor_key=my_pub)
    assert resp["name"] != real_name  # a different counter: the real one is untouched
    with pytest.raises(client.Refused, match="does not verify"):  # a forgery presented with the real vendor key
        client.call(card.home, control.LICENSE_FUND, 10, keyfile=forged, vendor_key=card.vendor_pub.read_bytes())
    other = lcp.issue(my_key, attrs.evolve(lic, card_key=crypto.public_der_of(crypto.generate_private_der("p256"))))
    with pytest.raises(client.Refused, match="not issued to this card"):
        client.call(card.home, control.LICENSE_FUND, 10, keyfile=other, vendor_key=my_pub)
    marker = card.root / "prefund"
    assert card.run(keyfile, *marker_program(marker)).returncode == 0
    assert card.peek(real_name) == 0


PROTECTED_PROGRAM = '''
import sys, time
from vsc.licensing import lcp

VENDOR_KEY = {vendor_pem!r}   # embedded: a swapped vendor.pub on disk changes nothing

def main():
    keyfile, home, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        lic = lcp.check(keyfile, VENDOR_KEY, home=home, product="editor", feature="pro",
                        charge=(mode == "charge"))
    except lcp.LicenseError as e:
        print(f"editor: {{e}}", file=sys.stderr)
        return 75
    print(f"editor {{lic.product}} running with {{','.join(lic.features)}}", flush=True)
    if mode == "guard":
        lcp.Guard(keyfile, VENDOR_KEY, home=home, product="editor", interval=0.3,
                  on_failure=lambda why: (print(f"editor: {{why}}", file=sys.stderr, flush=True),
                                          __import__("os")._exit(75))).start()
        open(sys.argv[4], "w").write("up")
        time.sleep(30)
        return 0
    return 0

sys.exit(main())
'''


@pytest.mark.integration
def test_python_api_protected_program(card):
    """
    A Python program protected with ``vsc.licensing.lcp.check`` (vendor key embedded)
    runs with the card; it refuses another product's keyfile, a rental with
    no runs left, and, once the card is removed, exits with one line; a
    ``Guard`` stops it within its interval when the card goes.
    """
    prog = card.root / "editor.py"
    prog.write_text(PROTECTED_PROGRAM.format(vendor_pem=card.vendor_pub.read_bytes()))
    env = dict(card.env, PYTHONPATH=str(Path(__file__).resolve().parent.parent))

    def editor(keyfile: Path, mode: str = "once", *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(prog), str(keyfile), str(card.home), mode, *extra], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT)

    keyfile = card.issue("api.key", "--features", "pro")
    ok = editor(keyfile)
    assert ok.returncode == 0 and ok.stdout == "editor editor running with pro\n", ok.stderr
    wrong = editor(card.issue("api-compiler.key", "--features", "pro", product="compiler"))
    assert wrong.returncode == 75 and wrong.stderr == "editor: the keyfile is for 'compiler', not 'editor'\n"
    basic = editor(card.issue("api-basic.key", "--features", "basic"))
    assert basic.returncode == 75 and "does not include the feature 'pro'" in basic.stderr
    rental = card.issue("api-rental.key", "--features", "pro", "--runs", "1")
    assert editor(rental, "charge").returncode == 0
    spent = editor(rental, "charge")
    assert spent.returncode == 75 and "no runs left on the licence for editor" in spent.stderr

    up = card.root / "editor.up"
    guarded = subprocess.Popen([sys.executable, str(prog), str(keyfile), str(card.home), "guard", str(up)], env=env,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for(up.exists, 20, "the guarded program to start")
        time.sleep(0.7)
        assert guarded.poll() is None
        card.remove_card()
        _, err = guarded.communicate(timeout=0.3 + 10 + 1)  # interval + the check's timeout + slack
        assert guarded.returncode == 75
        assert re.fullmatch(rf"editor: ({NO_CARD}).*\n", err), err
    finally:
        if guarded.poll() is None:
            guarded.kill()
            guarded.wait(10)
    gone = editor(keyfile)
    assert gone.returncode == 75 and gone.stderr.startswith("editor: no card is inserted") and gone.stdout == ""
