"""
The ``vsc`` command's structure (vsc/cli): the explicit table of
subcommands, lazy loading (only the chosen subcommand's module is
imported), the fast path of the ``vsc card`` requests (vsc.cli.argspec)
against argparse, one plain line per failure, ``vsc card remove`` returning
on the daemon's answer, and ``vsc bench`` finding the checkout.
"""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
import threading
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from tests.fakecard import FakeCardSocket, fake_home  # noqa: F401  (a fixture)
from vsc import cli
from vsc.cli import argspec, card

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def loaded_after(argv: list[str]) -> tuple[int, set[str], str]:
    """(exit code, modules loaded, stderr) of ``vsc ARGV`` run in a fresh interpreter."""
    code = ("import sys, io, contextlib\n"
            "from vsc.cli import main\n"
            "err = io.StringIO()\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
            "    try:\n"
            f"        rc = main({argv!r})\n"
            "    except SystemExit as e:\n"
            "        rc = e.code\n"
            "print(rc); print(' '.join(sorted(sys.modules))); print(err.getvalue(), end='')\n")
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr
    rc, modules, *err = proc.stdout.split("\n", 2)
    return int(rc), set(modules.split()), "".join(err)


HEAVY = ("twisted", "construct", "cryptography", "Crypto", "attrs")


def heavy(modules: set[str]) -> set[str]:
    """Which of HEAVY (top-level names) are among ``modules``."""
    return {m.split(".")[0] for m in modules} & set(HEAVY)


# ================================================================ the table


def test_every_row_of_the_table_builds_and_helps():
    """Each SUBCOMMANDS row names a module and entry that build the subcommand: ``vsc NAME --help`` exits 0 with its usage."""
    for name in cli.SUBCOMMANDS:
        out = io.StringIO()
        with redirect_stdout(out), pytest.raises(SystemExit) as info:
            cli.parse([name, "--help"])
        assert info.value.code == 0 and out.getvalue().startswith(f"usage: vsc {name} "), name


def test_help_lists_the_table_and_imports_no_subcommand():
    """``vsc --help`` lists every row with its help line and imports no subcommand module and nothing heavy."""
    code = ("import sys, io, contextlib\nfrom vsc.cli import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n    try:\n        main(['--help'])\n"
            "    except SystemExit:\n        pass\n"
            "print(' '.join(sorted(sys.modules))); print(out.getvalue())\n")
    proc = run_python(code)
    modules, text = proc.stdout.split("\n", 1)
    modules = set(modules.split())
    for name, row in cli.SUBCOMMANDS.items():
        assert name in text and row.help.split()[0] in text, name
        assert row.module not in modules, row.module
    assert heavy(modules) == set()


@pytest.mark.parametrize("argv, module", [
    (["card", "--home", "/nonexistent/vsc-home", "status"], "vsc.cli.card"),
    (["license", "show", "--license", "/nonexistent/k", "--vendor-key", "/nonexistent/v"], "vsc.licensing.cli"),
    (["admin", "--data-dir", "/nonexistent/d", "list"], "vsc.cli.admin"),
])
def test_only_the_chosen_subcommands_module_is_imported(argv, module):
    """Running a subcommand imports its own module and no other row's (no module registers itself anywhere)."""
    rc, modules, err = loaded_after(argv)
    assert rc == 1 and err.count("\n") == 1, err
    assert module in modules
    others = {row.module for row in cli.SUBCOMMANDS.values()} - {module}
    assert others & modules == set(), others & modules


def test_a_card_request_loads_neither_twisted_nor_construct_nor_argparse():
    """``vsc card status`` (no daemon here) runs on the fast path: no argparse, Twisted, construct or attrs."""
    rc, modules, err = loaded_after(["card", "--home", "/nonexistent/vsc-home", "status"])
    assert rc == 1 and err == ("vsc: no card daemon is running for /nonexistent/vsc-home "
                               "(start it: twistd -n vsc-card --home /nonexistent/vsc-home)\n")
    assert "argparse" not in modules
    assert heavy(modules) - {"cryptography", "Crypto"} == set()  # crypto libraries: until vsc.crypto is lazy


def test_a_card_request_does_not_load_openssl_to_hash():
    """
    ``vsc card sign`` hashes its input and names the control socket with
    crypto.sha256_light: no hashlib or _hashlib (libcrypto) is loaded, and
    sha256_light equals sha256 on empty, small, boundary and large inputs.
    """
    from vsc import crypto

    rc, modules, err = loaded_after(["card", "--home", "/nonexistent/vsc-home", "sign", "--slot", "9c", "--in",
                                     __file__, "--out", "/nonexistent/sig"])
    assert rc == 1 and "no card daemon is running" in err
    assert {"hashlib", "_hashlib", "hmac"} & modules == set()
    for n in (0, 1, 55, 64, 1000, crypto.LIGHT_SHA256_MAX, crypto.LIGHT_SHA256_MAX + 1):
        data = bytes(i % 251 for i in range(n))
        assert crypto.sha256_light(data) == crypto.sha256(data), n


def test_no_library_module_imports_the_command_line():
    """Below the command line (every vsc module but vsc.cli itself and the L5 commands), nothing imports vsc.cli."""
    commands = ("vsc.cli", "vsc.licensing.cli", "vsc.demo", "vsc.conformance")
    offenders = []
    for path in sorted((ROOT / "vsc").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if any(module == c or module.startswith(c + ".") for c in commands):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{module} imports {n}" for n in names if n == "vsc.cli" or n.startswith("vsc.cli.")]
    assert offenders == []


# ================================================================ the fast path equals argparse


def plain_argvs(name: str, options) -> list[list[str]]:
    """A plain argv per request, with every option given, and with only the required ones."""
    values = {}
    for o in options:
        values[o.name] = "1" if o.type is int else (o.choices[-1] if o.choices else "val")
    def build(chosen):
        words = []
        for o in chosen:
            words += [values[o.name]] if o.positional else ([o.name] if o.switch else [o.name, values[o.name]])
        return words
    full = [o for o in options if o.group is None or o.name == next(p.name for p in options if p.group == o.group)]
    required = [o for o in options if o.required or o.positional]
    return [["card", name, *build(full)], ["card", "--home", "/h", name, *build(required), "--json"]]


def variants(argv: list[str]) -> list[list[str]]:
    """The plain argv and spellings of it the fast path must leave to argparse (or read identically)."""
    out = [argv, argv + ["--json", "--json"], argv + ["-h"], argv + ["--bogus"], argv + ["extra"], argv[:-1]]
    for i, word in enumerate(argv):
        if word.startswith("--") and word not in ("--home", "--json") and i + 1 < len(argv):
            out.append(argv[:i] + [word[:4]] + argv[i + 1:])  # abbreviated option
            out.append(argv[:i] + [f"{word}={argv[i + 1]}"] + argv[i + 2:])
            out.append(argv[:i + 1] + ["-x"] + argv[i + 2:])  # a value that starts with a dash
            out.append(argv[:i + 1] + ["9z"] + argv[i + 2:])  # outside the choices, or not an integer
            out.append(argv + [word, argv[i + 1]])  # given twice
    if "--add" in argv:
        out.append(argv + ["--sub", "2"])  # both of an exclusive group
    return out


def argparse_result(argv: list[str]):
    err = io.StringIO()
    try:
        with redirect_stdout(io.StringIO()), redirect_stderr(err):
            return vars(cli.build_parser("card").parse_args(argv))
    except SystemExit:
        return None


def test_the_fast_path_reads_what_argparse_reads_or_leaves_it_to_argparse():
    """
    For every request of REQUESTS, its plain argv is read by the fast path
    (without argparse) to exactly argparse's result; every other spelling
    tried is either read identically or left to argparse (None), never read
    differently, and never read where argparse refuses.
    """
    fast_hits = 0
    for name, (_func, _help, options) in card.REQUESTS.items():
        for plain in plain_argvs(name, options):
            expected = argparse_result(plain)
            got = card.fast_args(plain[1:])
            assert expected is not None and got is not None and vars(got) == expected, (plain, got, expected)
            fast_hits += 1
            for argv in variants(plain):
                got = card.fast_args(argv[1:])
                if got is not None:
                    assert vars(got) == argparse_result(argv), argv
    assert fast_hits == 2 * len(card.REQUESTS)


def test_parse_plain_returns_defaults_and_refuses_what_it_cannot_read():
    """parse_plain fills defaults, reads switches, and returns None for a missing positional or an unknown option."""
    options = (argspec.Option("name"), argspec.Option("--n", type=int, default=3), argspec.Option("--q", switch=True))
    assert argspec.parse_plain(["a"], options) == {"name": "a", "n": 3, "q": False}
    assert argspec.parse_plain(["--q", "a", "--n", "4"], options) == {"name": "a", "n": 4, "q": True}
    assert argspec.parse_plain([], options) is None
    assert argspec.parse_plain(["a", "--m", "1"], options) is None


# ================================================================ one plain line per failure


def test_describe_never_names_a_class():
    """Unexpected errors are worded from their message (with the VSC_DEBUG hint), user-facing ones as they are."""
    from twisted.internet import error as terror

    from vsc.card.config import CardConfigError
    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode, WireError

    cases = [
        (CardConfigError("no password given (use --password-file for automation)"),
         "no password given (use --password-file for automation)"),
        (ValueError("bad\nvalue"), "bad value (set VSC_DEBUG=1 for a traceback)"),
        (KeyError(), "internal error (set VSC_DEBUG=1 for a traceback)"),
        (FileNotFoundError(2, "No such file or directory", "/x"), "/x: No such file or directory"),
        (WireError(ErrorCode.MALFORMED, "licence: product: too long"), "licence: product: too long"),
        (ChannelClosedError(ErrorCode.SERVER_KEY_MISMATCH, "pin"),
         "channel closed: SERVER_KEY_MISMATCH: the server's key is not the one pinned with --server-key "
         "(wrong server, or a man in the middle)"),
        (terror.ConnectionRefusedError(), "cannot connect to the server: connection refused"),
    ]
    for e, text in cases:
        assert cli.describe(e) == text
        assert type(e).__name__ not in cli.describe(e)


def test_a_password_prompt_without_a_terminal_is_one_line(tmp_path):
    """``vsc card passwd`` with no terminal and no --password-file says so in one line (issue 13, point 5)."""
    proc = subprocess.run([sys.executable, "-c", "import sys; from vsc.cli import main; sys.exit(main())", "card",
                           "--home", str(tmp_path), "passwd"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120,
                          start_new_session=True)  # no controlling terminal, whoever runs the tests
    assert proc.returncode == 1
    assert proc.stderr == "vsc: no password given (use --password-file for automation)\n"


# ================================================================ vsc card remove


def test_remove_returns_when_the_daemon_says_removed(fake_home):
    """
    ``vsc card remove`` returns (0, "card removed") on the daemon's answer,
    while the daemon still holds the connection open: it waits neither for
    the daemon to exit nor for the connection to close.
    """
    daemon = FakeCardSocket(fake_home, lambda command, args: {}, hold=True)
    out = io.StringIO()
    result: list[int] = []
    try:
        thread = threading.Thread(target=lambda: result.append(
            _quiet_main(["card", "--home", str(fake_home), "remove"], out)), daemon=True)
        thread.start()
        thread.join(30)
        assert result == [0] and out.getvalue() == "card removed\n"
        assert daemon.requests == [(b"Remove", {})]
        assert not daemon._released.is_set()  # the daemon had not let go when the command returned
    finally:
        daemon.close()


def _quiet_main(argv, out) -> int:
    with redirect_stdout(out):
        return cli.main(argv)


# ================================================================ vsc bench


def test_bench_finds_this_checkout_or_says_how_to_run_it(monkeypatch, capsys):
    """In this checkout ``vsc bench`` takes the runner's options; elsewhere it says in one line how to run it."""
    from vsc.cli import bench

    with pytest.raises(SystemExit) as info:
        cli.parse(["bench", "--help"])
    assert info.value.code == 0 and "--quick" in capsys.readouterr().out
    monkeypatch.setattr(bench, "CHECKOUT", "/nonexistent")
    assert cli.main(["bench", "--quick"]) == 1
    assert capsys.readouterr().err == f"vsc: {bench.NOT_HERE}\n"
