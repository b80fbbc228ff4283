"""
The `vsc conformance` harness run against our own server and card, as CI
does: every check of docs/protocol.md must pass, and the harness must fail
(exit non-zero) against an implementation that breaks the protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

from vsc.conformance import CARD_ITEMS, SERVER_ITEMS

from tests.integration import missing
from tests.servers import VSC, _env, init_data_dir, servers  # noqa: F401  (fixture)

HARNESS_TIMEOUT = 240


def run_harness(*args: str, timeout: float = HARNESS_TIMEOUT) -> tuple[int, list[dict], str]:
    r = subprocess.run([str(VSC), "conformance", "--json", *args], capture_output=True, text=True,
                       timeout=timeout, env=_env())
    results = json.loads(r.stdout) if r.stdout.strip().startswith("[") else []
    return r.returncode, results, r.stderr


#: The server settings of the conformance run (short timers keep the run bounded: the mutation script runs it
#: many times): the harness is told the same values with ``conformance_args``.
CONFORMANCE_SETTINGS = {
    "auth_deadline": 2, "handshake_timeout": 3, "unauthenticated_idle": 3, "idle_timeout": 5,
    "max_unauthenticated_per_source": 8, "lockout_threshold": 5,
    "suites": "aes256-gcm,chacha20-poly1305,aes256-cbc-hmac-sha256,des-cbc-md5", "allow_insecure": "true",
    # one source (127.0.0.1) makes every handshake of the run: not a flood (the harness retries SERVER_BUSY anyway);
    # and its failed authentications over all cards (per-source, in server memory) must not add up to a throttle
    # when the harness runs again and again against one server process (the mutation script does)
    "lockout_source": 1000000,
    "handshakes_per_second": 100000, "handshake_burst": 100000, "max_pending_handshakes": 100000,
}


def conformance_args(settings: dict = CONFORMANCE_SETTINGS) -> list[str]:
    """The harness options that tell it the server's settings."""
    return ["--auth-deadline", str(settings["auth_deadline"]),
            "--handshake-timeout", str(settings["handshake_timeout"]),
            "--unauthenticated-idle", str(settings["unauthenticated_idle"]),
            "--idle-timeout", str(settings["idle_timeout"]),
            "--unauthenticated-per-source", str(settings["max_unauthenticated_per_source"]),
            "--lockout-threshold", str(settings["lockout_threshold"]),
            "--server-suites", settings["suites"],
            *(["--allow-insecure"] if settings.get("allow_insecure") == "true" else [])]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m"):
    """A tmpfs of ``size`` at ``path`` (root: CI), unmounted afterwards: a disk that can be filled for real."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        missing("the STORAGE_FULL item needs a disk that can be filled: a small tmpfs, which needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        missing(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def storage_hooks(directory: Path) -> list[str]:
    """--fill-storage / --free-storage commands for a database in ``directory`` (a small file system)."""
    filler = shlex.quote(str(directory / "filler"))
    return ["--fill-storage", f"sh -c 'cat /dev/zero > {filler} 2>/dev/null; exit 0'",
            "--free-storage", f"rm -f {filler}"]


#: Every item a full server-mode run reports, in order (name as shown with CONFORMANCE_SETTINGS).
EXPECTED_SERVER_ITEMS = [
    *(f"{suite} fs={fs}" for suite in ("aes256-gcm", "chacha20-poly1305", "aes256-cbc-hmac-sha256", "des-cbc-md5")
      for fs in ("off", "require")),
    "the server's preference wins; des-cbc-md5 never chosen unless enabled",
    "wrong pinned key is detected",
    "wrong r1 -> HANDSHAKE_FAILED",
    "undecryptable key transport -> HANDSHAKE_FAILED",
    "downgraded offer -> KEY_CONFIRMATION_FAILED",
    "key transport one byte off the modulus length -> HANDSHAKE_FAILED",
    "clear r2 differs from the encrypted r2 -> HANDSHAKE_FAILED",
    "any one CLIENT_FINISHED MAC byte flipped -> KEY_CONFIRMATION_FAILED",
    "handshake messages out of order, a record before CLIENT_FINISHED -> UNEXPECTED_MESSAGE",
    "no key transport within 3 s -> HANDSHAKE_TIMEOUT",
    "a KEY_TRANSPORT replayed on a new connection -> HANDSHAKE_FAILED (r1 is fresh)",
    "an all-zero (small-order) X25519 key -> HANDSHAKE_FAILED",
    "tampered record -> BAD_RECORD",
    *(name for suite in ("aes256-gcm", "chacha20-poly1305", "aes256-cbc-hmac-sha256", "des-cbc-md5")
      for name in (f"{suite}: every byte of a record, each tag byte, flipped -> BAD_RECORD; reflected -> BAD_RECORD",
                   f"{suite}: truncated, extended, doubled and missing tags -> BAD_RECORD")),
    "replay of the last record and of one 3 back -> REPLAYED_RECORD (no window)",
    "a record 1 or 2^63 ahead, or with a seq byte flipped -> OUT_OF_ORDER_RECORD",
    "replayed record -> REPLAYED_RECORD",
    "reordered record -> OUT_OF_ORDER_RECORD",
    "oversized frame -> FRAME_TOO_LARGE",
    "truncated frame: connection closed, server keeps serving",
    "bad magic -> MALFORMED",
    "unknown message type -> UNKNOWN_TYPE",
    "echo of 32 KiB",
    "an unsolicited ECHO_REPLY is ignored",
    "an inner-only type as a frame, a frame type in a record -> UNEXPECTED_MESSAGE, any body",
    "an ALERT (known, unknown code, short) is never answered",
    "a sealed CLOSE (unknown code too) is never answered",
    "operation messages out of place -> UNEXPECTED_MESSAGE",
    "before establishment: 4097-byte header -> FRAME_TOO_LARGE, 4096 read",
    "unauthenticated: a 65536-byte record served, one byte more -> FRAME_TOO_LARGE",
    "a large upload: FRAME_TOO_LARGE before an operation passed, stored after",
    "unauthenticated idle: IDLE_TIMEOUT after 3 s, a record restarts it",
    "authenticated idle: IDLE_TIMEOUT after 5 s",
    "at most 8 unauthenticated connections per source; authenticating frees a place",
    "enrol, insert, sync, remove",
    "repeated insert after a drop is the same check-out",
    "second insert while in use -> IN_USE",
    "recover needs the MUK of the last insert",
    "repeated insert: the same check-out only with the same secret and MUK, else IN_USE",
    "sync, remove, attach, password change with another insert secret -> REFUSED, nothing changed",
    "recover: a wrong password -> REFUSED, another machine -> MUK_MISMATCH",
    "uploads on another version -> VERSION_CONFLICT, identical retry OK, insert gets the last",
    "remove/recover/sync refused when idle",
    "destroy is final -> DESTROYED",
    "wrong password, unknown serial look the same",
    "wrong Master key -> REFUSED",
    "a Master-key answer with its first or last byte flipped -> REFUSED",
    "reused enrolment code -> REFUSED",
    "a wrong enrolment code -> REFUSED, the right one then enrols",
    "an unanswered challenge holds nothing",
    "implementation auth later than 2 s -> TIMEOUT",
    "lockout: 5 failures throttle this source, never the owner's last machine",
    "5 unanswered challenges count like failures, never against the owner's last machine",
    "a full disk -> STORAGE_FULL, nothing changed",
    "an answer missing a challenged method -> REFUSED",
    "the owner's last machine is throttled after its own 5 failures too",
    "insert without an insert secret -> BAD_REQUEST",
    ("password change: OK v+1, then the new password opens the card and the old is REFUSED; "
     "a retry with another verifier -> VERSION_CONFLICT"),
    "a remove retried on an idle card: OK only with the stored upload on stored-1, else REFUSED",
    "recover forgets the insert: a remove retried with its secret -> REFUSED",
    "a success resets this source's failures on the card: failures before it do not throttle",
    "a refused sync and attach leave the channel unauthenticated: one byte over 65536 -> FRAME_TOO_LARGE",
]


def test_server_conformance_every_item_passes(tmp_path, servers):  # noqa: F811
    """
    A full server-mode run against our server (short timers, des-cbc-md5
    enabled, its database on a small tmpfs the storage hooks fill) reports
    exactly the expected items, in order, each with its § and §12 rules,
    none skipped, and every one passes.
    """
    with small_tmpfs(tmp_path / "small") as small:
        data = tmp_path / "srv"
        settings = dict(CONFORMANCE_SETTINGS, database=f"sqlite:///{small / 'vsc.sqlite3'}")
        info = init_data_dir(data, settings=settings)
        server = servers.start(data)
        code, results, err = run_harness("--server", server.endpoint, "--server-key", info["fingerprint"],
                                         "--admin-data-dir", str(data), *conformance_args(), *storage_hooks(small),
                                         timeout=HARNESS_TIMEOUT)
    failed = [r for r in results if not r["ok"] or r["skipped"]]
    assert not failed and code == 0, (failed, err[-2000:])
    assert [r["name"] for r in results] == EXPECTED_SERVER_ITEMS
    assert len(results) == len(SERVER_ITEMS)
    assert all(re.fullmatch(r"§\d+(\.\d+)*", r["section"]) and r["rules"] for r in results)
    print("\nconformance: " + ", ".join(f"{r['name'][:30]} {r['seconds']:.1f} s" for r in results
                                        if r["seconds"] > 2))


def test_server_items_without_hooks_are_reported_skipped(tmp_path, servers):  # noqa: F811
    """
    Without a provisioning hook the items that create cards are listed as
    skipped (never as passed, never left out), and so are the des-cbc-md5
    items without --allow-insecure; the run still passes on the others: the
    record and binding areas against a default server.
    """
    data = tmp_path / "srv"
    info = init_data_dir(data)
    server = servers.start(data)
    code, results, err = run_harness("--server", server.endpoint, "--server-key", info["fingerprint"],
                                     "--only", "record,binding", timeout=HARNESS_TIMEOUT)
    assert code == 0, ([r for r in results if not r["ok"]], err[-2000:])
    des = [r for r in results if r["name"].startswith("des-cbc-md5:")]
    assert des and all(r["skipped"] and "allow-insecure" in r["detail"] for r in des)
    binding = [r for r in results if r["area"] == "binding"]
    assert len(binding) == 3 and all(r["skipped"] and "--provision" in r["detail"] for r in binding)
    assert {r["area"] for r in results} == {"record", "binding"}
    assert any(not r["skipped"] for r in results if r["area"] == "record")


EXPECTED_CARD_ITEMS = [
    "correct: card must succeed", "wrong-key: card must refuse", "unoffered-suite: card must refuse",
    "bad-finished-mac: card must refuse", "finished-mac-first-byte: card must refuse",
    "tampered-record: card must refuse", "alert: card must refuse",
    "silent: card must refuse", "ops-correct: card must succeed", "rolls-back: card must refuse",
    "relabels: card must refuse", "weak-kdf: card must refuse", "other-salt: card must refuse",
    "long-challenge: card must refuse",
]


def test_card_conformance_against_our_card(tmp_path):
    """
    In card mode the harness plays a correct server and seven hostile ones
    (vsc ping), then a whole server with operations (our card through its
    driver: enrol, insert, step, remove): correct, one that rolls the stored
    copy back one upload, one that relabels the enrolment copy with a higher
    version, one that asks for the legacy KDF, and one whose Master-key
    challenge is 33 bytes. Our card passes every item.
    """
    code, results, err = run_harness("--card", timeout=300)
    assert code == 0, (results, err[-2000:])
    assert [r["name"] for r in results] == EXPECTED_CARD_ITEMS
    assert all(r["ok"] and not r["skipped"] for r in results)
    assert len(results) == len(CARD_ITEMS)


def test_harness_fails_against_a_broken_card(tmp_path):
    """
    A 'card' that claims success for everything (ping command and driver that
    always exit 0, doing nothing) fails every hostile scenario, and every
    operations item, since the server sees no enrolment: the harness exits
    non-zero; only the plain correct scenario passes.
    """
    code, results, _ = run_harness("--card", "--card-command", "true", "--card-driver", "true", timeout=300)
    assert code != 0
    assert [r["name"] for r in results] == EXPECTED_CARD_ITEMS
    assert [r["ok"] for r in results] == [True] + [False] * (len(EXPECTED_CARD_ITEMS) - 1)
    assert "the server has the card none" in results[8]["detail"]


def test_card_operations_items_are_skipped_without_a_driver(tmp_path):
    """With --card-driver '' the five operations items are reported skipped (not passed, not left out)."""
    code, results, _ = run_harness("--card", "--card-driver", "", timeout=300)
    assert code == 0
    ops_items = results[8:]
    assert [r["name"] for r in ops_items] == EXPECTED_CARD_ITEMS[8:]
    assert all(r["skipped"] and "--card-driver" in r["detail"] for r in ops_items)


def test_harness_needs_a_target():
    """Without --server/--server-key or --card the harness says so in one line and exits non-zero."""
    r = subprocess.run([str(VSC), "conformance"], capture_output=True, text=True, timeout=60, env=_env())
    assert r.returncode != 0
    assert "needs --server" in r.stderr and "Traceback" not in r.stderr


PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"


def test_every_item_names_a_section_and_rules_of_the_spec():
    """Each harness item (server and card mode) names a § heading of docs/protocol.md and §12 checklist identifiers that exist."""
    text = PROTOCOL_MD.read_text()
    sections = set(re.findall(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", text, re.M))
    rules = set(re.findall(r"^- \[ \] ([A-Z]\d+) ", text, re.M))
    assert "10.6.1" in sections and "3" in sections and "S1" in rules  # the patterns do read the spec
    items = list(SERVER_ITEMS) + list(CARD_ITEMS)
    for item in items:
        assert item.section[1:] in sections, (item.name, item.section)
        assert item.rules and set(item.rules) <= rules, (item.name, item.rules)
    names = [i.name for i in items]
    assert len(names) == len(set(names))


def test_a_card_item_without_a_misbehaving_server_is_refused():
    """A card-mode item whose scenario the harness's server cannot play fails loudly instead of passing as 'correct'."""
    import pytest

    from vsc.conformance.card import MISBEHAVIOURS, _misbehaving

    from vsc.conformance.card import OPS_SCENARIOS

    assert {i.scenario for i in CARD_ITEMS} - {"correct"} <= set(MISBEHAVIOURS) | set(OPS_SCENARIOS)
    with pytest.raises(ValueError, match="no server that misbehaves as 'rolls-forward'"):
        _misbehaving("rolls-forward", key=None)


def test_the_integrator_guide_lists_every_item_with_its_section():
    """docs/integrator.md §6.1 has a table row for every server and card item, with the item's § and rules."""
    import attrs

    from vsc.conformance.server import ServerSettings

    text = (PROTOCOL_MD.parent / "integrator.md").read_text()
    fields = attrs.asdict(ServerSettings())
    for item in SERVER_ITEMS:
        row = f"| {item.area} | {item.name.format(**fields)} | {item.section} | {', '.join(item.rules)} |"
        assert row in text, row
    for item in CARD_ITEMS:
        row = f"| {item.name} | {item.section} | {', '.join(item.rules)} |"
        assert row in text, row
