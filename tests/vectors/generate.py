"""
Generate the protected-channel test vectors (Figure 7, [0078]).

    .venv/bin/python tests/vectors/generate.py           # rewrite the JSON files
    .venv/bin/python tests/vectors/generate.py --check   # exit 1 if any file differs

One JSON file per suite x forward secrecy (on/off). Each runs a real server
and card sans-IO channel with seeded randomness (``support.DRBG``) and the
fixed RSA-2048 key in this directory, and records the inputs, the four
handshake frames, the derived key material and two sealed records each way.
tests/test_vectors.py regenerates every file byte for byte and re-derives it
independently.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tests`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from vsc import crypto
from vsc.protocol.channel import Established, Received, card_channel, server_channel
from vsc.protocol.suites import ChannelConfig, ForwardSecrecy, transcript_hash
from vsc.wire import decode_frame, encode_inner
from vsc.wire.messages import (
    EchoReply,
    EchoRequest,
    Hello,
    KeyTransport,
    Record,
    Suite,
    key_info,
)

from tests.vectors.support import DRBG, DRBG_DESCRIPTION, KEY_FILE, VECTORS_DIR, fixed_key, only, sends

SUITES = (Suite.AES256_GCM, Suite.CHACHA20_POLY1305, Suite.AES256_CBC_HMAC_SHA256, Suite.DES_CBC_MD5)

#: Bytes of record IV each suite draws per sealed record (AEAD suites draw none).
RECORD_IV_DRAW = {
    Suite.AES256_GCM: 0,
    Suite.CHACHA20_POLY1305: 0,
    Suite.AES256_CBC_HMAC_SHA256: 16,
    Suite.DES_CBC_MD5: 8,
}

KEY_SCHEDULE = {
    "transcript_hash": "TH = SHA-256(Hello frame || KeyTransport frame), whole frames including headers",
    "prk": "PRK = HMAC-SHA256(key = r1 || r2, data = s1 || s2 || X25519 shared secret (empty without forward secrecy))",
    "expand": "key = HKDF-Expand-SHA256(PRK, info, L); info = b'vsc1 ' || len(label) (1 byte) || label (ASCII) || suite (1 byte) || TH",
    "labels": {
        "aead": "c2s key (32), c2s iv (12), s2c key (32), s2c iv (12)",
        "cbc": "c2s enc (32), c2s mac (32), s2c enc (32), s2c mac (32)",
        "des": "none: DES key = s1[:8], MD5 key = s2, the same both ways ([0078])",
        "finished": "server finished (32), client finished (32), for every suite",
    },
    "finished_mac": "HMAC-SHA256(finished key, len(label) (1 byte) || label || TH || suite (1 byte) || forward_secret (1 byte)); labels 'server finished' / 'client finished'",
    "record_aad": "b'VS' || 0x01 || 0x10 || direction (0 card->server, 1 server->card) || seq (8 bytes big-endian)",
    "aead_nonce": "iv XOR (4 zero bytes || seq as 8-byte big-endian); sealed = ciphertext || 16-byte tag",
    "cbc_record": "sealed = IV (16, drawn) || AES-256-CBC(PKCS#7(inner)) || HMAC-SHA256(mac key, aad || IV || ciphertext)",
    "des_record": "sealed = IV (8, drawn) || DES-CBC(s1[:8], PKCS#5(inner)) || MD5(s2 || aad || IV || ciphertext)",
}

DRAW_ORDER = {
    "server": "r1 (32); X25519 private key (32) if the server's forward_secrecy is not off; then, for CBC suites, one IV per sealed server->card record (16 for aes256-cbc-hmac-sha256, 8 for des-cbc-md5)",
    "card": "r2 (32), s1 (32), s2 (32); X25519 private key (32) if the Hello carries an X25519 key and the card's forward_secrecy is not off; RSA-OAEP seed (32); then, for CBC suites, one IV per sealed card->server record",
}


def vector_name(suite: Suite, fs: bool) -> str:
    return f"{suite.label}-{'fs' if fs else 'nofs'}"


def vector_path(suite: Suite, fs: bool) -> Path:
    return VECTORS_DIR / f"{vector_name(suite, fs)}.json"


def configs(suite: Suite, fs: bool) -> tuple[ChannelConfig, ChannelConfig]:
    """The server accepts only ``suite``; the card offers the defaults (plus ``suite``)."""
    mode = ForwardSecrecy.PREFER if fs else ForwardSecrecy.OFF
    insecure = suite is Suite.DES_CBC_MD5
    card_suites = (Suite.AES256_GCM, Suite.CHACHA20_POLY1305, Suite.AES256_CBC_HMAC_SHA256)
    if suite not in card_suites:
        card_suites += (suite,)
    server = ChannelConfig(suites=(suite,), allow_insecure=insecure, forward_secrecy=mode)
    card = ChannelConfig(suites=card_suites, allow_insecure=insecure, forward_secrecy=mode)
    return server, card


def _config_json(cfg: ChannelConfig) -> dict:
    return {
        "suites": [s.label for s in cfg.suites],
        "allow_insecure": cfg.allow_insecure,
        "forward_secrecy": cfg.forward_secrecy.value,
    }


def _label_draws(draws: list[tuple[int, bytes]], labels: list[tuple[str, int]]) -> list[dict]:
    if [n for n, _ in draws] != [n for _, n in labels]:
        raise AssertionError(f"draw sizes {[n for n, _ in draws]} differ from the documented order {labels}")
    return [{"what": what, "bytes": n, "hex": data.hex()} for (n, data), (what, _) in zip(draws, labels)]


def build_vector(suite: Suite, fs: bool) -> dict:
    """Run one deterministic handshake and record exchange; return the vector."""
    name = vector_name(suite, fs)
    server_seed = f"vsc test vector {name} server".encode()
    card_seed = f"vsc test vector {name} card".encode()
    key = fixed_key()
    fingerprint = key.public_key().fingerprint()
    server_cfg, card_cfg = configs(suite, fs)
    srand, crand = DRBG(server_seed), DRBG(card_seed)
    server = server_channel(server_cfg, key, srand)
    card = card_channel(card_cfg, fingerprint, crand)

    card.start()
    (hello,) = sends(server.start())
    (kt,) = sends(card.receive_frame(hello))
    (sf,) = sends(server.receive_frame(kt))
    card_effects = card.receive_frame(sf)
    (cf,) = sends(card_effects)
    server_effects = server.receive_frame(cf)
    (card_up,) = only(card_effects, Established)
    (server_up,) = only(server_effects, Established)
    if card_up.info != server_up.info or card_up.info.suite is not suite or card_up.info.forward_secret is not (fs and suite is not Suite.DES_CBC_MD5):
        raise AssertionError(f"unexpected channel {card_up.info} / {server_up.info}")

    records = []
    for i in range(2):
        data = f"echo {i}: Figure 7 record from the card".encode()
        request, reply = EchoRequest(data), EchoReply(data)
        (c2s,) = sends(card.send(request))
        (s2c,) = sends(server.receive_frame(c2s))
        got = card.receive_frame(s2c)
        if got != [Received(reply)]:
            raise AssertionError(f"echo {i} came back as {got}")
        for direction, frame, msg in (("card->server", c2s, request), ("server->card", s2c, reply)):
            rec = decode_frame(frame)
            assert isinstance(rec, Record)
            entry = {"direction": direction, "seq": rec.seq, "inner": encode_inner(msg).hex(), "frame": frame.hex()}
            records.append(entry)

    # -- label every draw in the documented order (and fail if the code draws differently)
    iv = RECORD_IV_DRAW[suite]
    server_labels = [("r1", 32)] + ([("x25519 private key", 32)] if fs else [])
    card_labels = [("r2", 32), ("s1", 32), ("s2", 32)] + ([("x25519 private key", 32)] if fs else []) + [("oaep seed", 32)]
    if iv:
        server_labels += [(f"IV of server->card record {i}", iv) for i in range(2)]
        card_labels += [(f"IV of card->server record {i}", iv) for i in range(2)]
    server_draws = _label_draws(srand.draws, server_labels)
    card_draws = _label_draws(crand.draws, card_labels)

    # -- derived values, recomputed with the vsc helpers
    h = decode_frame(hello)
    k = decode_frame(kt)
    assert isinstance(h, Hello) and isinstance(k, KeyTransport)
    r1 = h.r1
    r2, s1, s2 = (crand.draws[i][1] for i in range(3))
    assert r2 == k.r2 and r1 == srand.draws[0][1]
    secrets = {"r1": r1.hex(), "r2": r2.hex(), "s1": s1.hex(), "s2": s2.hex()}
    shared = b""
    if fs:
        server_priv, card_priv = srand.draws[1][1], crand.draws[3][1]
        server_eph = crypto.X25519Ephemeral(lambda n: server_priv)
        card_eph = crypto.X25519Ephemeral(lambda n: card_priv)
        assert server_eph.public == h.fs_public and card_eph.public == k.fs_public
        shared = server_eph.exchange(card_eph.public)
        assert shared == card_eph.exchange(server_eph.public)
        secrets.update(
            server_x25519_private=server_priv.hex(),
            server_x25519_public=server_eph.public.hex(),
            card_x25519_private=card_priv.hex(),
            card_x25519_public=card_eph.public.hex(),
            x25519_shared=shared.hex(),
        )
    secrets["oaep_plaintext"] = (r1 + r2 + s1 + s2).hex()
    secrets["oaep_seed"] = card_draws[4 if fs else 3]["hex"]

    th = transcript_hash(hello, kt)
    prk = crypto.hkdf_extract(r1 + r2, s1 + s2 + shared)

    def expand(label: str, n: int) -> str:
        return crypto.hkdf_expand(prk, key_info(label, suite, th), n).hex()

    if suite in (Suite.AES256_GCM, Suite.CHACHA20_POLY1305):
        c2s_keys = {"key": expand("c2s key", 32), "iv": expand("c2s iv", 12)}
        s2c_keys = {"key": expand("s2c key", 32), "iv": expand("s2c iv", 12)}
    elif suite is Suite.AES256_CBC_HMAC_SHA256:
        c2s_keys = {"enc_key": expand("c2s enc", 32), "mac_key": expand("c2s mac", 32)}
        s2c_keys = {"enc_key": expand("s2c enc", 32), "mac_key": expand("s2c mac", 32)}
    else:
        c2s_keys = s2c_keys = {"des_key": s1[:8].hex(), "md5_key": s2.hex()}
    sf_msg, cf_msg = decode_frame(sf), decode_frame(cf)
    derived = {
        "transcript_hash": th.hex(),
        "prk": prk.hex(),
        "server_finished_key": expand("server finished", 32),
        "client_finished_key": expand("client finished", 32),
        "server_finished_mac": sf_msg.mac.hex(),
        "client_finished_mac": cf_msg.mac.hex(),
        "card_to_server": c2s_keys,
        "server_to_card": s2c_keys,
    }

    return {
        "name": name,
        "description": (
            f"Figure 7 channel, suite {suite.label}, "
            f"{'with' if fs else 'without'} X25519 forward secrecy: handshake and two echo records each way"
        ),
        "suite": {"label": suite.label, "code": int(suite)},
        # x25519: an X25519 secret was mixed into the key schedule (= SERVER_FINISHED's wire flag);
        # forward_secret: the channel is forward secret, which des-cbc-md5 never is (§7.6)
        "x25519": fs,
        "forward_secret": fs and suite is not Suite.DES_CBC_MD5,
        "inputs": {
            "rand": DRBG_DESCRIPTION,
            "server_seed": server_seed.hex(),
            "card_seed": card_seed.hex(),
            "server_key_file": KEY_FILE,
            "server_key_fingerprint": fingerprint,
            "server_key_spki": key.public_key().spki_der.hex(),
            "server_config": _config_json(server_cfg),
            "card_config": _config_json(card_cfg),
            "card_pinned_fingerprint": fingerprint,
            "records_sent": "the card sends EchoRequest(data) twice; the server answers each with EchoReply(data)",
        },
        "draw_order": DRAW_ORDER,
        "draws": {"server": server_draws, "card": card_draws},
        "key_schedule": KEY_SCHEDULE,
        "handshake": {
            "hello": hello.hex(),
            "key_transport": kt.hex(),
            "server_finished": sf.hex(),
            "client_finished": cf.hex(),
        },
        "secrets": secrets,
        "derived": derived,
        "records": records,
    }


def render(vector: dict) -> str:
    return json.dumps(vector, indent=2) + "\n"


def all_vectors() -> dict[Path, str]:
    return {vector_path(s, fs): render(build_vector(s, fs)) for s in SUITES for fs in (True, False)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    differ = []
    for path, text in all_vectors().items():
        if args.check:
            if not path.exists() or path.read_text() != text:
                differ.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if differ:
        print("vectors differ from the code: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
