"""
The card side of the benchmark's reporting (bench/latency.py, bench/__main__.py's Targets rows): the
parser of OpenSC's APDU log, the replay card's table, and the Targets rows made from a latency result.
Deterministic: no processes, fixed inputs.
"""

from __future__ import annotations

from bench import __main__ as runner
from bench import latency

#: two APDUs as OpenSC 0.23 logs them with OPENSC_DEBUG=9 (a 17-byte command spans two dump lines)
LOG = """P:1; T:0x1 10:00:00.100 [opensc-pkcs11] reader-pcsc.c:326:pcsc_transmit: \nOutgoing APDU (17 bytes):
00 87 07 9A 0B 1C D7 B0 D6 22 D0 10 61 B4 07 29 .........\"..a..)
00                                              .

P:1; T:0x1 10:00:00.100 [opensc-pkcs11] reader-pcsc.c:244:pcsc_internal_transmit: called
P:1; T:0x1 10:00:00.103 [opensc-pkcs11] reader-pcsc.c:335:pcsc_transmit: \nIncoming APDU (4 bytes):
61 08 90 00 a...

P:1; T:0x1 10:00:00.105 [opensc-pkcs11] reader-pcsc.c:326:pcsc_transmit: \nOutgoing APDU (13 bytes):
00 20 00 80 08 31 33 35 37 39 30 FF FF . ...135790..

P:1; T:0x1 10:00:00.111 [opensc-pkcs11] reader-pcsc.c:335:pcsc_transmit: \nIncoming APDU (2 bytes):
90 00 ..
"""


def test_opensc_apdu_log_is_parsed_into_commands_answers_and_times():
    """Each Outgoing/Incoming pair becomes one APDU: the bytes (multi-line dumps joined, the ASCII column
    dropped), the round trip OpenSC logged and when it started, in ms since the first."""
    apdus = latency.opensc_apdus(LOG.replace(" \n", "\n"))
    assert apdus == [
        {"cmd": "0087079a0b1cd7b0d622d01061b4072900", "resp": "61089000", "ms": 3.0, "at": 0.0},
        {"cmd": "0020008008313335373930ffff", "resp": "9000", "ms": 6.0, "at": 5.0},
    ]


def test_the_replay_card_answers_a_conversation_in_order_and_6a82_otherwise():
    """The same command answered twice gets its recorded answers in turn (then again from the first);
    a command never recorded is 6A82."""
    replay = latency.Replay([{"cmd": "00c0000000", "resp": "aa6100"}, {"cmd": "00c0000000", "resp": "bb9000"},
                             {"cmd": "00a4", "resp": "9000"}])
    get_response = bytes.fromhex("00c0000000")
    assert [replay(get_response) for _ in range(3)] == [bytes.fromhex(h) for h in ("aa6100", "bb9000", "aa6100")]
    assert replay(bytes.fromhex("00a4")) == b"\x90\x00"
    assert replay(b"\x00\xff") == b"\x6a\x82"


def _p(v: float) -> dict:
    return {"n": 10, "p50": v, "p95": v, "min": v}


LATENCY = {
    "amp": {"9a": _p(0.50)}, "floor": {"load_sign_9a": _p(0.45), "held_sign_9a": _p(0.23)},
    "pcsc": {"9a": _p(0.90), "9a_ext": _p(0.60), "roundtrip": _p(0.10)}, "pcsc_floor": _p(0.08),
    "key_cache": {"amp": {"9a": _p(0.26)}, "pcsc": {"9a": _p(0.60), "9a_ext": _p(0.40)}},
    "pcsc_tool_9a": _p(30.0), "softhsm": {"tool_rsa2048": _p(7.5)},
    "opensc": {"apdus": 42, "card": _p(31.0), "replay": _p(22.5)},
}


def test_the_card_targets_rows_say_the_ratio_the_verdict_and_why():
    """Every card row of the Targets table: figure / floor (a rate ratio for PIV), met against the issue's
    bound; the decrypt-on-use PIV rows say the most that policy allows, the pkcs11-tool row OpenSC's own cost."""
    rows = {fn.__name__: fn({"latency": LATENCY}) for fn in runner.TARGETS
            if fn.__name__.startswith(("target_local", "target_piv", "target_pkcs11", "target_apdu"))}
    assert rows["target_local_api"][3:] == ["1.11", "**yes**"]  # 0.50 / 0.45
    assert rows["target_local_api_cache"][3:] == ["1.13", "**yes**"]  # 0.26 / 0.23
    assert rows["target_piv_chained"][3:] == ["0.26", "no"]  # 0.23 / 0.90
    assert "at most 0.51×" in rows["target_piv_chained"][2] and "out of reach by construction" in rows[
        "target_piv_chained"][2]
    assert rows["target_piv_cached_extended"][3:] == ["0.57", "**yes**"] and "out of reach" not in rows[
        "target_piv_cached_extended"][2]
    assert rows["target_pkcs11_tool"][3:] == ["4.00", "no"]
    assert "22.50 ms (3.00× SoftHSM2" in rows["target_pkcs11_tool"][2] and "42 APDUs" in rows["target_pkcs11_tool"][2]
    assert rows["target_apdu_roundtrip"][3:] == ["1.25", "**yes**"]
    assert all(row is None for row in (fn({"latency": {"error": "skipped"}}) for fn in runner.TARGETS[11:]))
