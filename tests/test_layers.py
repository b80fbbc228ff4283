"""
The project's import rules, checked on the source with ``ast`` (so an import
inside a function counts, and so does ``importlib.import_module("name")`` or
``__import__("name")`` with a literal name).

Rules are rows of RULES: which modules a rule covers (module-name prefixes,
with exceptions) and which imports they may not make (module-name prefixes).
The layer order of docs/architecture.md will be more rows of the same table.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("vsc",)  # the packages whose modules the rules cover


@attrs.frozen
class Rule:
    """Modules named ``covers`` (prefixes), except ``exempt`` (prefixes), may not import ``forbidden`` (prefixes)."""

    name: str
    covers: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = ()
    why: str = ""

    def applies_to(self, module: str) -> bool:
        return _matches(module, self.covers) and not _matches(module, self.exempt)

    def refuses(self, imported: str) -> bool:
        return _matches(imported, self.forbidden)


#: The layers, lowest first (docs/architecture.md). A module may import its own layer or lower ones.
L0 = ("vsc.crypto", "vsc.util")
L1 = ("vsc.wire",)
L2 = ("vsc.protocol",)
L3 = ("vsc.net",)
L4 = ("vsc.server", "vsc.card", "vsc.dongle")
L5 = ("vsc.cli", "vsc.licensing", "vsc.conformance", "vsc.demo", "vsc.devtools", "vsc.daemon")
L6 = ("twisted.plugins",)
LAYERS = (L0, L1, L2, L3, L4, L5, L6)


def _above(layer: tuple[str, ...]) -> tuple[str, ...]:
    i = LAYERS.index(layer)
    return tuple(p for higher in LAYERS[i + 1:] for p in higher)


RULES = (
    Rule(
        "crypto libraries only in vsc.crypto",
        covers=("vsc",),
        exempt=("vsc.crypto",),
        forbidden=("cryptography", "Crypto", "Cryptodome", "hashlib", "hmac", "secrets"),
        why="vsc.crypto is the only place a crypto library, hashlib, hmac or secrets is imported",
    ),
    Rule("L0 crypto and util import no other part of vsc", covers=L0,
         forbidden=L1 + L2 + L3 + L4 + L5 + L6, why="the bottom layer stands alone"),
    Rule("L1 wire imports only L0", covers=L1, forbidden=_above(L1), why="wire <- protocol <- net <- ..."),
    Rule("L2 protocol imports only wire and L0", covers=L2, forbidden=_above(L2), why="wire <- protocol <- net <- ..."),
    Rule("L3 net imports only protocol and below", covers=L3, forbidden=_above(L3), why="protocol <- net <- ..."),
    Rule("L4 imports no L5 or plugin", covers=L4, forbidden=_above(L4), why="net <- server/card/dongle <- cli ..."),
    Rule("L5 imports no plugin", covers=L5, forbidden=L6, why="cli/licensing <- plugins"),
    Rule("the server imports no card or dongle", covers=("vsc.server",), forbidden=("vsc.card", "vsc.dongle"),
         why="server and card are peers that meet only on the wire"),
    Rule("the card imports no server or dongle", covers=("vsc.card",), forbidden=("vsc.server", "vsc.dongle"),
         why="where the card's information lives is a strategy it is given (vsc.daemon composes it)"),
    Rule("the dongle imports no server", covers=("vsc.dongle",), forbidden=("vsc.server",),
         why="a token card has no server"),
    Rule("no library module imports the command line", covers=("vsc",), exempt=L5, forbidden=("vsc.cli",),
         why="each layer words its own errors; only commands import vsc.cli"),
    Rule("wire and protocol do no I/O", covers=L1 + L2,
         forbidden=("twisted.internet", "socket", "subprocess", "threading", "sqlite3", "psycopg"),
         why="sans-IO: decode first, fire one input, return effects"),
)


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every module ``source`` imports, anywhere in it: (line, absolute module name)."""
    found: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def violations(rule: Rule, files: list[Path]) -> list[str]:
    out = []
    for path in files:
        module = module_name(path)
        if not rule.applies_to(module):
            continue
        for line, imported in imports_of(path.read_text(), module, path.name == "__init__.py"):
            if rule.refuses(imported):
                out.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {imported}")
    return out


def _sources() -> list[Path]:
    return sorted(p for top in SOURCES for p in (ROOT / top).rglob("*.py"))


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_rule_holds(rule: Rule):
    """No module the rule covers makes an import the rule forbids (imports inside functions included)."""
    files = _sources()
    assert any(rule.applies_to(module_name(p)) for p in files), "the rule covers no module: a typo in covers?"
    assert violations(rule, files) == [], rule.why


def test_the_checker_sees_every_form_of_import(tmp_path, monkeypatch):
    """The checker flags a forbidden import at the top, inside a function, as from-import, relative, and through importlib or __import__; it leaves vsc.crypto and innocent names alone."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    pkg = tmp_path / "vsc"
    (pkg / "crypto").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "crypto" / "__init__.py").write_text("import hashlib\nfrom cryptography import x509\n")
    (pkg / "bad.py").write_text(
        "import os\n"
        "import hashlib\n"
        "def f():\n    import hmac\n"
        "from cryptography.hazmat.primitives import hashes\n"
        "from Crypto.Cipher import DES\n"
        "import importlib\nimportlib.import_module('secrets')\n"
        "__import__('Cryptodome.Hash')\n"
        "from . import crypto\n"
        "import hashlibx, hmacs\n"
    )
    rule = RULES[0]
    found = violations(rule, sorted(pkg.rglob("*.py")))
    assert [v.split(": ")[0] for v in found] == [f"vsc/bad.py:{n}" for n in (2, 4, 5, 5, 6, 6, 8, 9)], found
    assert not any("crypto/__init__" in v or "hashlibx" in v or "hmacs" in v for v in found)
    assert imports_of("from .. import wire\n", "vsc.card.cli") == [(1, "vsc"), (1, "vsc.wire")]
