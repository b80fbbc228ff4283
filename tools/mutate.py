#!/usr/bin/env python3
"""
The mutation self-test of ``vsc conformance`` (issue 14): does the harness
notice when a security check of the server or the card is weakened?

Each ``Mutant`` below is one single-point change to a security check —
an exact (file, original snippet, replacement) with a name and the rule of
docs/protocol.md it weakens. For each mutant the script

1. copies ``vsc/`` and ``twisted/`` of this tree into a scratch directory and
   applies the change there (the working tree is never touched; a snippet that
   is not found exactly once is an error, so the list cannot silently rot);
2. server mutants: starts a real ``twistd vsc-server`` from the scratch copy
   (``PYTHONPATH``) on a fresh data directory and runs ``vsc conformance``
   (from this, unmutated, tree) against it; card mutants: runs ``vsc
   conformance --card`` with a ``--card-command`` that runs the card from the
   scratch copy;
3. reports the mutant *caught* (with the items that failed) or *missed*, or
   *error* when the run itself did not work (the server did not start, the
   harness printed no JSON, the per-mutant timeout passed).

Before the mutants, the unmutated scratch copy is run the same way
("baseline"): every item must pass, or the results mean nothing.

    .venv/bin/python tools/mutate.py                 # every mutant
    .venv/bin/python tools/mutate.py --subset ci     # the CI subset (tests/test_mutate.py)
    .venv/bin/python tools/mutate.py --only NAME,... --jobs 2 --json out.json
    .venv/bin/python tools/mutate.py --check         # only verify that every snippet applies

Prints one line per mutant, then a JSON summary (``--json PATH`` writes it to
a file instead of stdout). Exits 0 when every mutant ran and was caught, 1 when
one was missed, 2 on an error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import configparser
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
VSC = BIN / "vsc"
TWISTD = BIN / "twistd"
TIMEOUT = 600.0  # seconds per mutant (server start + the whole harness run)

#: The mutant server's settings (vsc-server.ini [server]), as tests/test_conformance.py runs the harness: every
#: suite (des-cbc-md5 too, so its record checks are exercised), short timers (the harness waits each out once),
#: and admission generous enough for the harness's many handshakes from 127.0.0.1 (it is not a flood).
SERVER_SETTINGS = {
    "suites": "aes256-gcm,chacha20-poly1305,aes256-cbc-hmac-sha256,des-cbc-md5",
    "allow_insecure": "true",
    "auth_deadline": "2",
    "handshake_timeout": "3",
    "unauthenticated_idle": "3",
    "idle_timeout": "5",
    "max_unauthenticated_per_source": "8",
    "lockout_threshold": "5",
    "lockout_source": "1000000",
    "handshakes_per_second": "100000",
    "handshake_burst": "100000",
    "max_pending_handshakes": "100000",
}
#: The harness options that tell it those settings (passed when this harness has the option).
HARNESS_SETTINGS = {
    "--auth-deadline": "auth_deadline",
    "--handshake-timeout": "handshake_timeout",
    "--unauthenticated-idle": "unauthenticated_idle",
    "--idle-timeout": "idle_timeout",
    "--unauthenticated-per-source": "max_unauthenticated_per_source",
    "--lockout-threshold": "lockout_threshold",
    "--server-suites": "suites",
}


@functools.lru_cache(maxsize=None)
def _help() -> str:
    return subprocess.run([str(VSC), "conformance", "--help"], capture_output=True, text=True, timeout=120,
                          env=_env(None)).stdout


@functools.lru_cache(maxsize=None)
def harness_args() -> tuple[str, ...]:
    """``--allow-insecure`` and the settings options that this tree's ``vsc conformance`` knows."""
    known = _help()
    args = ["--allow-insecure"]
    for flag, setting in HARNESS_SETTINGS.items():
        if flag in known:
            args += [flag, SERVER_SETTINGS[setting]]
    return tuple(args)


@dataclass(frozen=True)
class Mutant:
    """One single-point change: ``original`` (found exactly once in ``file``) becomes ``replacement``."""

    name: str
    rule: str  # the § of docs/protocol.md and the rule the change weakens
    file: str  # relative to the repository root
    original: str
    replacement: str
    mode: str = "server"  # "server": run the server-mode harness; "card": card mode
    ci: bool = False  # in the CI subset (tests/test_mutate.py)
    areas: tuple[str, ...] = ()  # --focus: run only these harness areas (the full run always runs every item)


CH = "vsc/protocol/channel.py"
AEAD = "vsc/crypto/aead.py"
LC = "vsc/protocol/lifecycle.py"
OPS = "vsc/protocol/server_ops.py"
LOCK = "vsc/protocol/lockout.py"
STORE = "vsc/server/store.py"

MUTANTS: tuple[Mutant, ...] = (
    # ---- records (§8): replay and reorder windows, counters
    Mutant("replay-window-one-record", "§8 R4: a record whose sequence number is below the expected one is a replay",
           CH, "if record.seq < self.recv_seq:", "if record.seq < self.recv_seq - 1:", ci=True,
           areas=("record",)),
    Mutant("reorder-window-one-record", "§8 R4: a record above the expected sequence number is out of order",
           CH, "if record.seq > self.recv_seq:", "if record.seq > self.recv_seq + 1:"),
    Mutant("recv-counter-stuck", "§8 R4: the receive sequence number advances with every record",
           CH, "        self.recv_seq += 1\n", "        self.recv_seq += 0\n"),
    Mutant("replay-check-removed", "§8 R4: replayed records are refused",
           CH, "if record.seq < self.recv_seq:", "if record.seq < 0:"),
    # ---- records (§8): tags, per suite
    Mutant("cbc-hmac-tag-half-compared", "§8 R2: every byte of the aes256-cbc-hmac-sha256 tag is checked",
           AEAD, "if not constant_time_equal(self._tag(aad, iv, ct), tag):",
           "if not constant_time_equal(self._tag(aad, iv, ct)[:16], tag[:16]):", ci=True, areas=("record",)),
    Mutant("cbc-hmac-tag-last-byte-ignored", "§8 R2: every byte of the aes256-cbc-hmac-sha256 tag is checked",
           AEAD, "if not constant_time_equal(self._tag(aad, iv, ct), tag):",
           "if not constant_time_equal(self._tag(aad, iv, ct)[:-1], tag[:-1]):"),
    Mutant("cbc-hmac-tag-unchecked", "§8 R2: the aes256-cbc-hmac-sha256 tag is checked",
           AEAD, "if not constant_time_equal(self._tag(aad, iv, ct), tag):",
           "if not constant_time_equal(tag, tag):"),
    Mutant("des-md5-tag-half-compared", "§8 R2: every byte of the des-cbc-md5 keyed hash is checked",
           AEAD, "if not constant_time_equal(md5(self._s2 + aad + iv + ct), tag):",
           "if not constant_time_equal(md5(self._s2 + aad + iv + ct)[:8], tag[:8]):"),
    Mutant("des-md5-tag-first-byte-ignored", "§8 R2: every byte of the des-cbc-md5 keyed hash is checked",
           AEAD, "if not constant_time_equal(md5(self._s2 + aad + iv + ct), tag):",
           "if not constant_time_equal(md5(self._s2 + aad + iv + ct)[1:], tag[1:]):"),
    Mutant("cbc-hmac-mac-omits-header", "§7.5 R2: the aes256-cbc-hmac-sha256 MAC covers the header and sequence number",
           AEAD, "        mac.update(aad)\n", "        mac.update(b\"\")\n"),
    # ---- handshake (§6, §7)
    Mutant("r1-unchecked", "§6.5 S2: the key transport must echo the server's r1",
           CH, "if not crypto.constant_time_equal(secrets.r1, core.hello.r1):",
           "if not crypto.constant_time_equal(secrets.r1, secrets.r1):"),
    Mutant("r2-unchecked", "§6.5 S2: r2 in the clear must equal r2 inside the key transport",
           CH, "if not crypto.constant_time_equal(secrets.r2, msg.r2):",
           "if not crypto.constant_time_equal(secrets.r2, secrets.r2):"),
    Mutant("client-finished-mac-half-compared", "§7.3 S5: every byte of the client finished MAC is checked",
           CH, "if not crypto.constant_time_equal(msg.mac, core.keys.client_mac()):",
           "if not crypto.constant_time_equal(msg.mac[:16], core.keys.client_mac()[:16]):"),
    Mutant("client-finished-mac-unchecked", "§7.3 S5: the client finished MAC is checked",
           CH, "if not crypto.constant_time_equal(msg.mac, core.keys.client_mac()):",
           "if not crypto.constant_time_equal(msg.mac, msg.mac):"),
    Mutant("hello-r1-fixed", "§6.5 S1: HELLO has a fresh random r1 per connection (no handshake replays)",
           CH, "        r1 = core.rand(32)\n", "        r1 = bytes(32)\n",
           areas=("handshake",)),
    Mutant("x25519-small-order-accepted", "§6.5 B2: an all-zero X25519 secret (small-order key) is HANDSHAKE_FAILED",
           CH, "dh = core.ephemeral.exchange(msg.fs_public)\n            except crypto.CryptoError as e:\n"
               "                inputs.fail(ErrorCode.HANDSHAKE_FAILED, str(e))\n                return",
           "dh = core.ephemeral.exchange(msg.fs_public)\n            except crypto.CryptoError as e:\n"
               "                dh = bytes(32)",
           areas=("handshake",)),
    # ---- frame limits and timeouts (§3, §9.3)
    Mutant("frame-limit-ignores-lowered-cap", "§3 F4 / §9.3: a frame over the current limit is FRAME_TOO_LARGE",
           "vsc/wire/codec.py", "if length > self.max_body:", "if length > MAX_FRAME_BODY:"),
    Mutant("handshake-frame-cap-lifted", "§3 F4: frames are at most 4 KiB until the handshake completes",
           CH, "return self._core.max_body if self._core.established else MAX_HANDSHAKE_BODY",
           "return self._core.max_body"),
    Mutant("unauthenticated-frame-cap-lifted", "§9.3: an unauthenticated channel carries at most 64 KiB frames",
           "vsc/server/service.py",
           "config = attrs.evolve(config, max_body=lim.max_unauthenticated_body, idle_timeout=lim.unauthenticated_idle)",
           "config = attrs.evolve(config, max_body=MAX_FRAME_BODY, idle_timeout=lim.unauthenticated_idle)"),
    Mutant("idle-timeout-never-fires", "§9.3: an established channel idle longer than its limit closes with IDLE_TIMEOUT",
           CH, "        if core.idle_timeout > 0:\n            inputs.fail(ErrorCode.IDLE_TIMEOUT",
           "        if core.idle_timeout < 0:\n            inputs.fail(ErrorCode.IDLE_TIMEOUT"),
    Mutant("auth-deadline-ignored", "§10.6.1 O4: an answer later than the deadline is TIMEOUT",
           OPS, "core.emit(StartDeadline(core.policy.auth_deadline))",
           "core.emit(StartDeadline(core.policy.auth_deadline * 1000))"),
    # ---- life cycle and machine binding (§10.8, §10.11, §10.13)
    Mutant("repeat-insert-ignores-machine", "§10.8 O6: a repeated insert is the same check-out only from the same machine",
           LC, "same = card.session_hash == req.session_hash and card.muk == req.muk",
           "same = card.session_hash == req.session_hash", ci=True, areas=("binding",)),
    Mutant("repeat-insert-ignores-secret", "§10.8 O6: a repeated insert must present the same insert secret",
           LC, "same = card.session_hash == req.session_hash and card.muk == req.muk",
           "same = card.muk == req.muk"),
    Mutant("recover-ignores-machine", "§10.11 O7: recover needs the MUK of the last insert",
           LC, "return Condition.LAST_MACHINE if card.muk == req.muk else Condition.OTHER_MACHINE",
           "return Condition.LAST_MACHINE if card.muk is not None else Condition.OTHER_MACHINE"),
    Mutant("recover-table-other-machine-ok", "§10.11 O7: recover from another machine is MUK_MISMATCH",
           LC, "_row(S.IN_USE, \"recover\", C.OTHER_MACHINE, Status.MUK_MISMATCH, None),",
           "_row(S.IN_USE, \"recover\", C.OTHER_MACHINE, Status.OK, S.IDLE, A.RELEASE),"),
    Mutant("session-ops-ignore-secret", "§10.9/§10.10 O5: sync and remove need the current insert's secret",
           LC, "if card.session_hash is None or card.session_hash != req.session_hash:",
           "if card.session_hash is None:", ci=True, areas=("binding",)),
    Mutant("sync-any-version-current", "§10.9 O8: a sync based on another version is VERSION_CONFLICT",
           LC, "    if req.version == card.version:\n        return Condition.CURRENT",
           "    if req.version >= card.version:\n        return Condition.CURRENT"),
    Mutant("stale-upload-is-retry", "§10.9 O8: a retry must carry the stored upload; another is VERSION_CONFLICT",
           LC, "if req.version == card.version - 1 and req.protected == card.protected:",
           "if req.version == card.version - 1:"),
    Mutant("idle-sync-allowed", "§10.13 O5: sync on an idle card is REFUSED",
           LC, "_row(S.IDLE, \"sync, password\", C.ANY, Status.REFUSED, None),",
           "_row(S.IDLE, \"sync, password\", C.ANY, Status.OK, None),"),
    Mutant("in-use-insert-allowed", "§10.13 O5: an insert while in use (not a retry) is IN_USE",
           LC, "_row(S.IN_USE, \"insert\", C.OTHERWISE, Status.IN_USE, None),",
           "_row(S.IN_USE, \"insert\", C.OTHERWISE, Status.OK, S.IN_USE, A.CHECK_OUT),"),
    Mutant("destroyed-insert-allowed", "§10.11 O7: a destroyed card refuses every operation with DESTROYED",
           LC, "_row(S.DESTROYED, AUTH_OPS, C.ANY, Status.DESTROYED, None, history=\"destroyed\"),",
           "_row(S.DESTROYED, AUTH_OPS, C.ANY, Status.OK, None, history=\"destroyed\"),"),
    Mutant("attach-ignores-secret", "§10.13 O5: attaching to an in-use card needs its insert secret",
           LC, "same = card.session_hash is not None and card.session_hash == req.session_hash",
           "same = card.session_hash is not None"),
    Mutant("insert-without-secret", "§10.8: an insert carries a 32-byte MUK and a 32-byte insert secret",
           OPS, "if len(resp.muk) != 32 or len(req.insert_secret) != 32:", "if len(resp.muk) != 32:"),
    Mutant("password-change-keeps-verifier", "§10.9: a password change stores the new verifier and KDF",
           LC, "_row(S.IN_USE, \"password\", C.CURRENT, Status.OK, None, A.STORE_PASSWORD),",
           "_row(S.IN_USE, \"password\", C.CURRENT, Status.OK, None, A.STORE),",
           areas=("versions",)),
    Mutant("password-retry-other-verifier", "§10.9: a retried password change must carry the stored verifier and KDF",
           LC, "if op is Operation.PASSWORD and (req.verifier, req.kdf) != (card.verifier, card.kdf):",
           "if False and op is Operation.PASSWORD and (req.verifier, req.kdf) != (card.verifier, card.kdf):",
           areas=("versions",)),
    Mutant("idle-remove-retry-other-upload", "§10.10: a remove retried on an idle card must carry the stored upload",
           LC, "and req.protected == card.protected and req.version == card.version - 1)",
           "and req.version == card.version - 1)",
           areas=("versions",)),
    Mutant("idle-remove-retry-any-version", "§10.10: a remove retried on an idle card must be based on stored - 1",
           LC, "and req.protected == card.protected and req.version == card.version - 1)",
           "and req.protected == card.protected)",
           areas=("versions",)),
    Mutant("refused-operation-raises-limits", "§9.3: only an operation that passed its authority raises the limits",
           OPS, "            if outcome.status is Status.OK:\n                core.emit(Authenticated(core.serial))",
           "            if outcome.status in (Status.OK, Status.REFUSED):\n"
           "                core.emit(Authenticated(core.serial))",
           areas=("limits",)),
    Mutant("recover-keeps-session", "§10.11 O10: recover forgets the insert secret (no retried remove)",
           STORE, "sql = (\"UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, last_session = NULL, \"",
           "sql = (\"UPDATE cards SET state = 'idle', muk = NULL, channel_info = NULL, \"",
           areas=("life cycle",)),
    # ---- enrolment (§10.7)
    Mutant("enrol-code-unchecked", "§10.7 O3: enrolment needs the issued one-time code",
           STORE, "valid = row is not None and bytes(row[0]) == e.code_hash and row[1] >= now",
           "valid = row is not None and row[1] >= now"),
    Mutant("implementation-auth-not-challenged", "§10.6.2 O3: every configured implementation method is challenged",
           OPS, "            methods = required_methods(card.auth_info, core.policy)",
           "            methods = (AuthMethod.PASSWORD,)"),
    # ---- authentication (§10.6)
    Mutant("password-unchecked", "§10.6.1 O2: the password answer is checked against the verifier",
           OPS, "            failed.append(method.label)\n", "            pass\n"),
    Mutant("missing-answers-accepted", "§10.6 O3: every challenged method must be answered",
           OPS, "if len(resp.responses) != len(core.issued):", "if len(resp.responses) > len(core.issued):"),
    Mutant("master-key-prefix-compared", "§10.6.2 O3: every byte of the Master key MAC is checked",
           "vsc/protocol/auth.py", "return crypto.constant_time_equal(resp.mac, master_mac(master, ri1, resp.ri2, serial))",
           "return crypto.constant_time_equal(resp.mac[:1], master_mac(master, ri1, resp.ri2, serial)[:1])"),
    Mutant("master-key-last-byte-ignored", "§10.6.2 O3: every byte of the Master key MAC is checked",
           "vsc/protocol/auth.py", "return crypto.constant_time_equal(resp.mac, master_mac(master, ri1, resp.ri2, serial))",
           "return crypto.constant_time_equal(resp.mac[:-1], master_mac(master, ri1, resp.ri2, serial)[:-1])"),
    # ---- lockout (§10.6.3)
    Mutant("lockout-threshold-off-by-one", "§10.6.3 O10: from the threshold on, the next answer waits",
           LOCK, "        if failures < t:\n            return 0.0", "        if failures <= t:\n            return 0.0",
           ci=True, areas=("refusal",)),
    Mutant("source-bucket-not-counting", "§10.6.3 O10: a failure counts in the source's bucket",
           LOCK, "            b.failures += 1\n", "            b.failures += 0\n"),
    Mutant("source-throttle-inverted", "§10.6.3 O10: a throttled source's answer is refused unevaluated",
           LOCK, "                if b.next_allowed > now:\n                    return True",
           "                if b.next_allowed < now:\n                    return True"),
    Mutant("success-keeps-source-failures", "§10.6.3 O11: a success resets the source's bucket for that card",
           OPS, "        core.limits.succeeded(core.source, core.serial)\n        req = core.request\n",
           "        req = core.request\n",
           areas=("refusal",)),
    Mutant("stranger-failure-uncounted", "§10.6.3 O10: a stranger's failed answer is counted",
           OPS, "            if not own:\n                core.limits.failed(core.source, core.serial)",
           "            if own:\n                core.limits.failed(core.source, core.serial)"),
    Mutant("every-answer-own-machine", "§10.6.3 O10: only the last insert's MUK counts in the owner's bucket",
           OPS, "return bool(last) and len(muk) == len(last) and crypto.constant_time_equal(muk, last)",
           "return bool(last)"),
    Mutant("own-machine-never-throttled", "§10.6.3 O10: the owner's machine is throttled after its own failures",
           OPS, "            throttled = card.throttled(now, True)", "            throttled = False"),
    # ---- the card (card mode): what it checks of the server
    Mutant("card-pin-prefix-compared", "§6.4 C1: the card compares the whole pinned fingerprint, not only its algorithm label",
           CH, "if not crypto.constant_time_equal(fp.encode(), core.pinned_fingerprint.encode()):",
           "if not crypto.constant_time_equal(fp.encode()[:7], core.pinned_fingerprint.encode()[:7]):",
           mode="card"),
    Mutant("card-server-finished-mac-half-compared", "§7.3 C5: the card checks every byte of the server finished MAC",
           CH, "if not crypto.constant_time_equal(msg.mac, keys.server_mac()):",
           "if not crypto.constant_time_equal(msg.mac[16:], keys.server_mac()[16:]):", mode="card"),
    Mutant("card-accepts-unoffered-suite", "§6.3 C3: the card refuses a suite it did not offer",
           CH, "if msg.suite not in core.offered:", "if msg.suite not in tuple(Suite):", mode="card"),
    Mutant("card-kdf-floor-ignored", "§10.5 K1: the card refuses a weaker password derivation than it enrolled with",
           "vsc/card/ops.py", "    if minimum is None:\n        return",
           "    if minimum is not None:\n        return", mode="card"),
    Mutant("card-salt-not-pinned", "§10.5 K10: the card refuses a challenge naming another salt than its own",
           "vsc/card/ops.py", "    if salt and (kdf.alg is not KdfAlg.SCRYPT",
           "    if False and salt and (kdf.alg is not KdfAlg.SCRYPT", mode="card"),
    Mutant("card-rollback-window-one-generation", "§10.12 K8: the card refuses a copy older than the last it saw stored",
           "vsc/card/freshness.py", "if rec is None or memory.generation > rec.generation:",
           "if rec is None or memory.generation > rec.generation - 2:", mode="card"),
    Mutant("card-no-handshake-timer", "§6.3 B3: the card gives up on a server that does not finish the handshake",
           CH, "    def start(inputs: ChannelInputs, core: ChannelCore) -> None:\n"
               "        core.emit(SetTimer(core.config.handshake_timeout))",
           "    def start(inputs: ChannelInputs, core: ChannelCore) -> None:\n"
               "        core.emit(SetTimer(core.config.handshake_timeout * 1000))", mode="card"),
)


# ---------------------------------------------------------------- applying


class SnippetError(Exception):
    """A mutant's original snippet is not found exactly once: the list has rotted."""


def mutated_text(m: Mutant, root: Path = ROOT) -> str:
    """The file's text with the mutation applied; SnippetError unless the original occurs exactly once."""
    text = (root / m.file).read_text()
    n = text.count(m.original)
    if n != 1:
        raise SnippetError(f"{m.name}: the snippet occurs {n} times in {m.file} (expected once): {m.original!r}")
    if m.original == m.replacement:
        raise SnippetError(f"{m.name}: the replacement is the original")
    return text.replace(m.original, m.replacement)


def check_all(mutants=MUTANTS, root: Path = ROOT) -> list[str]:
    """Every problem with the list (snippets not found once, duplicate names); [] when all apply."""
    problems = []
    names = [m.name for m in mutants]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"{name}: the name is used twice")
    for m in mutants:
        try:
            text = mutated_text(m, root)
            compile(text, m.file, "exec")
        except (SnippetError, SyntaxError) as e:
            problems.append(str(e))
    return problems


def scratch_tree(dest: Path, m: Mutant | None) -> None:
    """Copy vsc/ and twisted/ (the plugin) into ``dest``, with the mutation applied (None: unmutated)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for top in ("vsc", "twisted"):
        shutil.copytree(ROOT / top, dest / top, ignore=ignore)
    if m is not None:
        (dest / m.file).write_text(mutated_text(m))


# ---------------------------------------------------------------- running


@dataclass
class Outcome:
    name: str
    mode: str
    rule: str
    result: str  # caught | missed | error
    caught_by: list = field(default_factory=list)  # the items that failed
    items: int = 0  # how many items ran
    seconds: float = 0.0
    detail: str = ""


def _env(scratch: Path | None) -> dict:
    """The environment of a child: the mutated scratch copy first on the path, or (None) this tree (the harness)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSC_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    if scratch is not None:
        env["PYTHONPATH"] = str(scratch)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # the .pyc files in the scratch copy show it was imported
    return env


def _harness(args: list[str], timeout: float) -> tuple[list[dict], str]:
    r = subprocess.run([str(VSC), "conformance", "--json", *args], capture_output=True, text=True,
                       timeout=timeout, env=_env(None), cwd="/")
    out = r.stdout.strip()
    if not out.startswith("["):
        raise RuntimeError(f"the harness printed no JSON (exit {r.returncode}): {r.stderr.strip()[-300:]}")
    return json.loads(out), r.stderr


def _init_data_dir(data: Path) -> str:
    r = subprocess.run([str(VSC), "admin", "--data-dir", str(data), "init", "--key-bits", "2048", "--json"],
                       capture_output=True, text=True, timeout=120, env=_env(None))
    if r.returncode != 0:
        raise RuntimeError(f"vsc admin init failed: {r.stderr.strip()[-300:]}")
    ini = data / "vsc-server.ini"
    parser = configparser.ConfigParser()
    parser.read(ini)
    for k, v in SERVER_SETTINGS.items():
        parser["server"][k] = v
    with open(ini, "w") as f:
        parser.write(f)
    return json.loads(r.stdout)["fingerprint"]


def _run_server_mode(scratch: Path, work: Path, deadline: float, areas: tuple[str, ...] = ()) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    from vsc.devtools.process import ProcessFailed, VscServer

    data = work / "data"
    fingerprint = _init_data_dir(data)
    server = VscServer(data, work / "server.log", 0, launcher=[str(TWISTD)], env=_env(scratch))
    server.spawn()
    try:
        try:
            server.wait_listening(60.0)
        except ProcessFailed as e:
            raise RuntimeError(f"the mutant server did not start: {e.reason}: {e.log[-300:]}") from None
        # the server imports from the scratch copy, not this tree: its modules were compiled there
        if not any((scratch / "vsc" / "server").glob("__pycache__/service*.pyc")):
            raise RuntimeError("the server did not run from the scratch copy (no compiled vsc/server there)")
        results, _ = _harness(["--server", server.endpoint, "--server-key", fingerprint,
                               "--admin-data-dir", str(data), *harness_args(),
                               *(["--only", ",".join(areas)] if areas else [])],
                              max(1.0, deadline - time.monotonic()))
        return results
    finally:
        server.stop()


def _run_card_mode(scratch: Path, deadline: float) -> list[dict]:
    """The card-mode harness (this tree) with the card under test (ping, and the operations driver) from ``scratch``."""
    path = f"env PYTHONPATH={shlex.quote(str(scratch))}"
    card = f"{path} {shlex.quote(str(VSC))} ping --server {{endpoint}} --server-key {{fingerprint}} --count 2 --handshake-timeout 5"
    args = ["--card", "--card-command", card, "--timeout", "60"]
    if "--card-driver" in _help():
        args += ["--card-driver", f"{path} {shlex.quote(sys.executable)} -m vsc.conformance.vscdriver {{action}} --dir {{dir}} "
                                  "--endpoint {endpoint} --fingerprint {fingerprint} --serial {serial} --code {code}"]
    results, _ = _harness(args, max(1.0, deadline - time.monotonic()))
    return results


def run_one(m: Mutant | None, mode: str = "server", timeout: float = TIMEOUT, keep: bool = False,
            areas: tuple[str, ...] = ()) -> Outcome:
    """Run one mutant (None: the unmutated baseline in ``mode``) in its own scratch directory; ``areas``: only those."""
    name = m.name if m else f"baseline-{mode}"
    mode = m.mode if m else mode
    t0 = time.monotonic()
    out = Outcome(name, mode, m.rule if m else "", "error")
    work = Path(tempfile.mkdtemp(prefix=f"vsc-mutant-{name}-"))
    try:
        scratch = work / "tree"
        scratch_tree(scratch, m)
        deadline = t0 + timeout
        results = (_run_server_mode(scratch, work, deadline, areas) if mode == "server"
                   else _run_card_mode(scratch, deadline))
        failed = [f"{r['section']} {r['name']}" for r in results if not r["ok"] and not r.get("skipped")]
        out.items = len(results)
        out.caught_by = failed
        if not results:
            out.detail = "the harness ran no item"
        else:
            out.result = "caught" if failed else "missed"
            out.detail = "; ".join(r["detail"] for r in results if not r["ok"] and not r.get("skipped"))[:400]
    except subprocess.TimeoutExpired:
        out.detail = f"timed out after {timeout:g} s"
    except (RuntimeError, SnippetError, OSError) as e:
        out.detail = str(e)[:400]
    finally:
        out.seconds = round(time.monotonic() - t0, 1)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subset", choices=("ci",), help="only the CI subset")
    p.add_argument("--only", help="comma-separated mutant names")
    p.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (default 1)")
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per mutant")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline runs")
    p.add_argument("--focus", action="store_true",
                   help="run only the harness areas each mutant names (the baseline: all of them); for CI")
    p.add_argument("--check", action="store_true", help="only verify that every snippet applies")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--keep", action="store_true", help="keep the scratch directories")
    p.add_argument("--json", dest="json_path", help="write the JSON summary here (default: stdout)")
    args = p.parse_args(argv)

    problems = check_all()
    if problems:
        for line in problems:
            print(f"mutate: {line}", file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(MUTANTS)} mutants apply to {ROOT}")
        return 0
    mutants = list(MUTANTS)
    if args.subset == "ci":
        mutants = [m for m in mutants if m.ci]
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {m.name for m in MUTANTS}
        if unknown:
            print(f"mutate: no mutant named {sorted(unknown)[0]!r} (see --list)", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.name in wanted]
    if args.list:
        for m in mutants:
            print(f"{m.name:40} {m.mode:6} {m.file}: {m.rule}")
        return 0

    t0 = time.monotonic()
    baselines: list[Outcome] = []
    if not args.no_baseline:
        for mode in sorted({m.mode for m in mutants}):
            union = tuple(sorted({a for m in mutants if m.mode == mode for a in m.areas})) if args.focus else ()
            b = run_one(None, mode, args.timeout, areas=union)
            baselines.append(b)
            ok = b.result == "missed" and b.items > 0  # the unmutated tree must pass every item
            print(f"baseline {mode}: {'all ' + str(b.items) + ' items pass' if ok else 'FAILED: ' + (b.detail or ', '.join(b.caught_by))} "
                  f"({b.seconds:g} s)", flush=True)
            if not ok:
                return 2
    outcomes: list[Outcome] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, m, m.mode, args.timeout, args.keep, m.areas if args.focus else ()): m
                   for m in mutants}
        for fut in concurrent.futures.as_completed(futures):
            o = fut.result()
            outcomes.append(o)
            by = f" by {o.caught_by[0]}" + (f" (+{len(o.caught_by) - 1})" if len(o.caught_by) > 1 else "") \
                if o.caught_by else ""
            print(f"{o.result.upper():6} {o.name} [{o.mode}]{by}{'' if o.result == 'caught' else ': ' + o.detail} "
                  f"({o.seconds:g} s)", flush=True)
    order = {m.name: i for i, m in enumerate(MUTANTS)}
    outcomes.sort(key=lambda o: order[o.name])
    counts = {k: sum(o.result == k for o in outcomes) for k in ("caught", "missed", "error")}
    summary = {
        "mutants": len(outcomes),
        **counts,
        "caught_percent": round(100.0 * counts["caught"] / len(outcomes), 1) if outcomes else 0.0,
        "seconds": round(time.monotonic() - t0, 1),
        "baseline": [asdict(b) for b in baselines],
        "results": [asdict(o) for o in outcomes],
    }
    text = json.dumps(summary, indent=2)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    else:
        print(text)
    print(f"{counts['caught']} of {len(outcomes)} mutants caught ({summary['caught_percent']}%), "
          f"{counts['missed']} missed, {counts['error']} errors", file=sys.stderr)
    return 2 if counts["error"] else (1 if counts["missed"] else 0)


if __name__ == "__main__":
    sys.exit(main())
