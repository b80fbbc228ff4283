"""
The duplication-protected medium of claim 10 / Figure 15: any PKCS#11 token
(a hardware token in practice; SoftHSM2 in tests), through python-pkcs11.

The token holds ([0108]-[0110]):
  * the DongleKey: an AES-256 secret key, sensitive and non-extractable,
    generated on the token — nobody, the issuer included, ever sees it;
  * the protected information, encrypted with the VSC-Key (the owner's
    password key, as on a server), as a private data object. Tokens do not
    let a data object's value be changed in place, so each write creates a
    new object with a higher generation and then deletes the older ones: a
    crash in between leaves both, and the newest wins.
  * the KDF parameters of the owner's password, as a second data object.

PKCS#11 calls block; the card glue runs them on a thread. python-pkcs11
calls C_Initialize(NULL), which tells the module that it will never be
called from two threads at once (SoftHSM2 then takes no locks of its own and
corrupts its heap when a periodic check meets a write), so a process-wide
lock is held for the whole life of every ``Token`` session.
"""

from __future__ import annotations

import os
import re
import threading

import attrs

DONGLE_KEY_LABEL = "vsc-dongle-key"
PROTECTED_LABEL = "vsc-protected"
KDF_LABEL = "vsc-kdf"
SERIAL_LABEL = "vsc-serial"

PIN_ON_COMMAND_LINE = ("the token PIN does not belong on the command line, where other users can read it: "
                       "remove pin-value= from the URI and give --token-pin-file")


#: one Token session at a time in this process (see the module docstring)
_MODULE_LOCK = threading.RLock()


class TokenError(Exception):
    """The token is missing, locked, or refused an operation (message is user-facing)."""


@attrs.frozen
class TokenRef:
    module: str
    token_label: str
    pin: str = attrs.field(repr=False)

    @classmethod
    def parse(cls, uri: str, pin: str | None = None) -> "TokenRef":
        """``pkcs11:token=LABEL;module-path=/path/lib.so[;pin-value=PIN]`` (RFC 7512 subset)."""
        if not uri.startswith("pkcs11:"):
            # not echoed: it may hold pin-value=
            raise TokenError("not a pkcs11: URI (pkcs11:token=LABEL;module-path=LIB)")
        attrs_ = {}
        for part in re.split(r"[;?&]", uri[len("pkcs11:"):]):
            if part:
                k, _, v = part.partition("=")
                from urllib.parse import unquote

                attrs_[k] = unquote(v)
        if not attrs_.get("token"):
            raise TokenError("the pkcs11: URI needs token=LABEL")
        module = attrs_.get("module-path") or os.environ.get("VSC_PKCS11_MODULE") or "/usr/lib/softhsm/libsofthsm2.so"
        the_pin = pin if pin is not None else attrs_.get("pin-value")
        if the_pin is None:
            raise TokenError("no token PIN: give --token-pin-file")
        return cls(module=module, token_label=attrs_["token"], pin=the_pin)

    @staticmethod
    def strip_pin(uri: str) -> str:
        """The URI without pin-value=, wherever ``parse`` would find it (any attribute, after ';', '?' or '&')."""
        if not uri.startswith("pkcs11:"):
            return uri
        parts = [p for p in re.split(r"[;?&]", uri[len("pkcs11:"):]) if p]
        kept = [p for p in parts if p.partition("=")[0] != "pin-value"]
        return uri if kept == parts else "pkcs11:" + ";".join(kept)  # parse reads ';' like '?' and '&'

    @classmethod
    def from_command_line(cls, uri: str, pin: str | None) -> "TokenRef":
        """A URI given as an argument: its pin-value= is refused (any local user can read a process's arguments)."""
        if cls.strip_pin(uri) != uri:
            raise TokenError(PIN_ON_COMMAND_LINE)
        return cls.parse(uri, pin)


class Token:
    """An open session on the token; use as a context manager."""

    def __init__(self, ref: TokenRef, rw: bool = False):
        self.ref = ref
        self.rw = rw
        self._session = None

    def __enter__(self) -> "Token":
        _MODULE_LOCK.acquire()
        try:
            return self._open()
        except BaseException:
            _MODULE_LOCK.release()
            raise

    def _open(self) -> "Token":
        import pkcs11

        try:
            lib = pkcs11.lib(self.ref.module)
        except Exception as e:  # noqa: BLE001 - a missing or broken module
            raise TokenError(f"cannot load the PKCS#11 module {self.ref.module}: {e}") from None
        try:
            token = lib.get_token(token_label=self.ref.token_label)
        except Exception:  # noqa: BLE001 - NoSuchToken, MultipleTokensReturned, slot errors
            raise TokenError(f"the token {self.ref.token_label!r} is not present") from None
        try:
            self._session = token.open(user_pin=self.ref.pin, rw=self.rw)
        except pkcs11.exceptions.PinIncorrect:
            raise TokenError("the token PIN is wrong") from None
        except pkcs11.exceptions.PinLocked:
            raise TokenError("the token PIN is locked") from None
        except Exception as e:  # noqa: BLE001
            raise TokenError(f"cannot open the token {self.ref.token_label!r}: {e.__class__.__name__}") from None
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._session is not None:
                try:
                    self._session.close()
                except Exception:  # noqa: BLE001 - the token may be gone already
                    pass
                self._session = None
        finally:
            _MODULE_LOCK.release()

    # -- the DongleKey (Figure 14)

    def create_dongle_key(self) -> None:
        from pkcs11 import Attribute, KeyType

        if self._find_key() is not None:
            raise TokenError("the token already holds a DongleKey; use a fresh token (or vsc dongle replace)")
        self._session.generate_key(
            KeyType.AES, 256, label=DONGLE_KEY_LABEL, store=True,
            template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                      Attribute.DECRYPT: False, Attribute.WRAP: False, Attribute.UNWRAP: False},
        )

    def _find_key(self):
        """The DongleKey: a private key, so one made without the PIN (a public one, same label) is not it."""
        from pkcs11 import Attribute, KeyType, ObjectClass

        try:
            keys = list(self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY,
                                                   Attribute.KEY_TYPE: KeyType.AES,
                                                   Attribute.LABEL: DONGLE_KEY_LABEL, Attribute.PRIVATE: True}))
        except Exception as e:  # noqa: BLE001 - the token went away between open and lookup
            raise TokenError(f"the token {self.ref.token_label!r} failed to find its DongleKey: "
                             f"{e.__class__.__name__}") from None
        if len(keys) > 1:
            raise TokenError(f"the token {self.ref.token_label!r} failed to find its DongleKey: "
                             "MultipleObjectsReturned")
        return keys[0] if keys else None

    def respond(self, challenge: bytes) -> bytes:
        """Figure 14, 1207-1208: the token encrypts one 16-byte challenge with the DongleKey."""
        from pkcs11 import Mechanism

        key = self._find_key()
        if key is None:
            raise TokenError("the token holds no DongleKey")
        try:
            return key.encrypt(challenge, mechanism=Mechanism.AES_ECB)
        except Exception as e:  # noqa: BLE001
            raise TokenError(f"the token refused to answer the challenge: {e.__class__.__name__}") from None

    # -- data objects

    def _objects(self, label: str) -> list:
        """The card's objects: private ones only. A session that never logged in can make public token objects
        (any label, any generation); the card neither reads nor deletes those."""
        from pkcs11 import Attribute, ObjectClass

        return list(self._session.get_objects({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label,
                                               Attribute.PRIVATE: True}))

    @staticmethod
    def _generation(obj) -> int:
        from pkcs11 import Attribute

        try:
            app = obj[Attribute.APPLICATION]
            return int(app.split(":", 1)[1]) if app.startswith("vsc:") else -1
        except Exception:  # noqa: BLE001
            return -1

    def read(self, label: str) -> bytes | None:
        from pkcs11 import Attribute

        objs = self._objects(label)
        if not objs:
            return None
        return bytes(max(objs, key=self._generation)[Attribute.VALUE])

    def write(self, label: str, value: bytes) -> None:
        """Create the new generation first, then delete the older ones (crash-safe)."""
        from pkcs11 import Attribute, ObjectClass

        old = self._objects(label)
        gen = max((self._generation(o) for o in old), default=0) + 1
        self._session.create_object({
            Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label, Attribute.APPLICATION: f"vsc:{gen}",
            Attribute.VALUE: value, Attribute.TOKEN: True, Attribute.PRIVATE: True,
        })
        for o in old:
            o.destroy()
