"""
Review: docs that cannot drift. The pages promise users exact things —
history lines an administrator alerts on, ``--json`` fields, card.ini keys,
command-line options. Each test here reads the promise out of the markdown
(tables, ``--json`` paragraphs, examples) and compares it with what the code
does, so a change on either side that is not made on the other fails here.
tests/docrun.py runs the console examples and tests/test_settings.py the
server's settings table; these cover what those do not.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

import pytest

from tests import docrun

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def section(path: Path, heading: str) -> str:
    """The text of the markdown section whose heading starts with ``heading``, up to the next one of its level."""
    text = path.read_text()
    start = next(m for m in re.finditer(r"^(#+) (.*)$", text, re.M) if m.group(2).startswith(heading))
    level = len(start.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start.end())
    return text[start.end():end.start() if end else len(text)]


def wildcard(doc: str) -> str:
    """A documented line as a docrun pattern: numbers and placeholders (T, N, ...) match anything."""
    return re.sub(r"\d+|\b[A-Z]\b", "...", doc)


def matches(doc: str, real: str) -> bool:
    return docrun.match([wildcard(doc)], [real]) is None


def contains(doc: str, real: str) -> bool:
    return docrun.match(["..." + wildcard(doc) + "..."], [real]) is None


# ---------------------------------------------------------------- the lockout in the history


def test_the_lockout_history_detail_is_the_documented_one(tmp_path):
    """
    docs/admin.md shows what a throttled card's history says (§7 history's
    example, §13's troubleshooting row) and tells the administrator to alert
    on it (§11: "lockouts (`...` in `detail`)"). The page said ``(failed:
    password; locked out until T after N failures)``, a wording the store no
    longer writes (since the lockout became a throttle, vsc.server.store
    writes "N failures from ...: next answer evaluated after S s"): an alert
    on the documented text never fired however hard a serial was guessed at.
    Now every documented form matches the detail the store writes for the
    fifth failure from the owner's machine (lockout_threshold, 5).
    """
    from vsc.protocol.cardstore import CountFailure, EnrolCard
    from vsc.protocol.auth import code_hash
    from vsc.protocol.lifecycle import Operation
    from vsc.server.store import Store

    store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", lambda: 1_795_681_431.0)
    try:
        store.migrate()
        store.issue("alice", code_hash("CODE"), '{"methods": ["password"]}', ttl=600)
        store.enrol(EnrolCard("alice", code_hash("CODE"), b"v" * 32, b"kdf", b"p", b"", {}, "tcp:127.0.0.1:1"))
        for _ in range(5):
            store.count_failure(CountFailure("alice", Operation.INSERT, "127.0.0.1:49630", "failed: password",
                                             b"M" * 32, True))
        details = [e.as_dict()["detail"] for e in store.history("alice")][-5:]
    finally:
        store.close()
    first, lockout = details[0], details[-1]
    assert first == "failed: password" and lockout != first  # the store did start a throttle

    page = ROOT / "docs" / "admin.md"
    example = section(page, "history")
    shown = re.findall(r"^\d{4}-.* insert +refused .*\((.*)\)$", example, re.M)
    assert len(shown) == 2, "the history section shows a refused insert, then the one that starts a lockout"
    assert matches(shown[0], first), (shown[0], first)
    assert matches(shown[1], lockout), (shown[1], lockout)
    # every `insert refused ... (DETAIL)` the page quotes (§2's Master key, §13's table), for any method's failure
    from vsc.protocol.server_ops import METHODS

    real = [d.replace("password", m.label) for m in METHODS.values() for d in (first, lockout)]
    quoted = re.findall(r"`insert refused \.\.\. \(([^`]*)\)`", page.read_text())
    assert len(quoted) >= 2, "the page explains the history's refusals"
    for q in quoted:
        assert any(matches(q, r) for r in real), (q, real)
    alerts = re.findall(r"`([^`]+)` in `detail`", page.read_text())
    assert alerts, "the monitoring section names what to alert on in the history's detail"
    for alert in alerts:
        assert contains(alert.replace("...", "").strip(), lockout), (alert, lockout)


# ---------------------------------------------------------------- vsc admin --json


def admin_json_fields() -> dict[str, set[str]]:
    """command -> the names the ``--json`` paragraph of its section of docs/admin.md §7 lists."""
    text = section(ROOT / "docs" / "admin.md", "7.")
    out = {}
    for m in re.finditer(r"^### (\w+)(.*?)(?=^### |\Z)", text, re.M | re.S):
        para = re.search(r"`--json`:(.*?)(?:\n\n|\Z)", m.group(2), re.S)
        if para:
            # `name`, or "name": inside a JSON shape such as `{"cards": [...]}`
            out[m.group(1)] = {a or b for a, b in re.findall(r"`([a-z_]+)`|\"([a-z_]+)\":", para.group(1))}
    return out


def emitted_names(data) -> set[str]:
    """The keys of a JSON answer, and of the objects one level inside it (list items, nested objects)."""
    names = set()
    for k, v in data.items():
        names.add(k)
        for item in (v if isinstance(v, list) else [v]):
            if isinstance(item, dict):
                names.update(item)
    return names


def test_every_admin_json_field_is_documented(tmp_path, capsys):
    """
    docs/admin.md §7 lists, under each command, the fields of its
    ``--json`` answer: monitoring is written against that list (§11: "list
    --json for states and lockouts; show SERIAL --json for one card").
    ``show --json`` also carried ``machine_failures`` (the owner's-machine
    bucket of §9, which the text output shows as "N from its last
    machine"), documented nowhere. Now every field each command emits, on
    an issued code, a card in use, a throttled card, a copy and a
    replacement, is in its section's list.
    """
    from vsc.cli import main
    from vsc.protocol.auth import code_hash
    from vsc.protocol.cardstore import CheckOut, CountFailure, EnrolCard
    from vsc.protocol.lifecycle import Operation
    from vsc.server import config
    from vsc.server.store import Store

    d = str(tmp_path / "srv")

    def run(*argv) -> dict:
        capsys.readouterr()
        assert main(["admin", "--data-dir", d, *argv, "--json"]) == 0, capsys.readouterr().err
        return json.loads(capsys.readouterr().out)

    assert main(["admin", "--data-dir", d, "init", "--key-bits", "2048"]) == 0
    got: dict[str, set[str]] = {}

    def note(command, data):
        got.setdefault(command, set()).update(emitted_names(data))

    note("issue", run("issue", "alice"))
    note("show", run("show", "alice"))
    note("list", run("list"))
    note("issue", run("issue", "bob"))
    note("revoke", run("revoke", "bob"))
    store = Store(config.load(d).database_url, __import__("time").time)  # clock-ok: the CLI reads the wall clock
    try:
        code = run("issue", "alice")["code"]
        store.enrol(EnrolCard("alice", code_hash(code), b"v" * 32, b"kdf", b"p", b"", {}, "tcp:127.0.0.1:1"))
        store.check_out(CheckOut("alice", b"M" * 32, b"S" * 32, {"suite": "aes256-gcm", "peer": "p"}, "p",
                                 b"v" * 32))
        for _ in range(5):
            store.count_failure(CountFailure("alice", Operation.INSERT, "p", "failed: password", b"M" * 32, True))
    finally:
        store.close()
    for command in ("show", "list", "history"):
        note(command, run(command, *(["alice"] if command != "list" else [])))
    note("unlock", run("unlock", "alice"))
    note("duplicate", run("duplicate", "alice", "alice-copy"))
    note("replace", run("replace", "alice-copy"))
    note("replace", run("replace", "alice", "--policy", "fresh"))
    note("destroy", run("destroy", "alice-copy-r1"))

    documented = admin_json_fields()
    for command, names in got.items():
        assert command in documented, f"admin.md §7 has no --json paragraph for {command}"
        missing = names - documented[command]
        assert not missing, f"vsc admin {command} --json emits {sorted(missing)}, which admin.md §7 does not list"


# ---------------------------------------------------------------- card.ini


def card_ini_tables() -> dict[str, str]:
    """key -> its row, from the card.ini tables of docs/card.md and docs/dongle.md (a cell may name several)."""
    rows = {}
    for page in ("card.md", "dongle.md"):
        text = section(ROOT / "docs" / page, "Settings (`HOME/card.ini`")
        for line in text.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| `") else []
            for key in re.findall(r"`([a-z_]+)`", cells[0] if cells else ""):
                rows[key] = line
    return rows


def card_ini_keys_read() -> set[str]:
    """
    The card.ini keys the card side reads: vsc/card/config.py's section
    (``s.get``, ``s[...]``, ``_number(path, s, NAME, ...)``) and the
    ``settings.get(NAME)`` of every card-side module.
    """
    keys = set()
    for pkg in ("card", "cli", "daemon", "dongle", "licensing"):
        for path in (ROOT / "vsc" / pkg).rglob("*.py"):
            section_module = path == ROOT / "vsc" / "card" / "config.py"
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                    recv, first = ast.unparse(node.func.value), node.args[0]
                    if (node.func.attr in ("get", "getboolean", "getfloat", "getint")
                            and isinstance(first, ast.Constant) and isinstance(first.value, str)
                            and ("settings" in recv or (section_module and recv == "s"))):
                        keys.add(first.value)
                elif isinstance(node, ast.Call) and ast.unparse(node.func) == "_number":
                    keys.add(node.args[2].value)
                elif (section_module and isinstance(node, ast.Subscript) and ast.unparse(node.value) == "s"
                      and isinstance(node.slice, ast.Constant)):
                    keys.add(node.slice.value)
    return keys


def test_every_card_ini_key_is_documented_with_its_default(tmp_path):
    """
    docs/card.md's settings table (with docs/dongle.md's for a card on a
    token) is where a user learns what card.ini holds and may edit. The card
    reads ``applications`` (which card applications PC/SC sees, chosen with
    ``enroll --applications``) and ``totp`` (whether the insert asks for a
    TOTP code), and neither was in either table. Now the tables list every
    key the code reads and nothing it does not, and the documented default
    of each numeric or channel setting is the code's.
    """
    from vsc.card import config as cc

    rows = card_ini_tables()
    read = card_ini_keys_read()
    assert read - set(rows) == set(), f"card.ini keys the code reads that no table documents: {read - set(rows)}"
    assert set(rows) - read == set(), f"documented card.ini keys the code never reads: {set(rows) - read}"
    home = tmp_path / "home"
    cc.save(home, server="tcp:127.0.0.1:7390", server_key="SHA256:x", serial="alice")  # every other key: its default
    cfg = cc.load(home)
    effective = dict(muk_poll=cfg.muk_poll, clock_poll=cfg.clock_poll, clock_tolerance=cfg.clock_tolerance,
                     reconnect_attempts=cfg.reconnect_attempts, suites=",".join(s.label for s in cfg.channel.suites),
                     allow_insecure=cfg.channel.allow_insecure, forward_secrecy=cfg.channel.forward_secrecy.value,
                     handshake_timeout=cfg.channel.handshake_timeout)
    for key, value in effective.items():
        default = [c.strip() for c in rows[key].strip().strip("|").split("|")][1].strip("`")
        shown = (str(value).lower() if isinstance(value, bool)
                 else f"{value:g}" if isinstance(value, float) else str(value))
        assert default == shown, f"card.ini {key}: documented default {default!r}, the code's {shown!r}"


def test_a_misspelt_applications_setting_is_refused_not_widened(tmp_path):
    """
    card.ini's ``applications`` says which card applications PC/SC sees
    (docs/card.md, settings; ``enroll --applications piv`` keeps OpenPGP
    off). A value the card does not know (``applications = pvi``, a typo
    when narrowing it by hand) was silently read as *both* applications
    (vsc.card.config.applications_of fell back to the default): the card
    served more than its owner asked for, and said nothing. Now such a value
    is one line naming the setting, and the card does not start with it, as
    for the other settings.
    """
    from vsc.card import config as cc

    home = tmp_path / "home"
    cc.save(home, server="tcp:127.0.0.1:7390", server_key="SHA256:x", serial="alice", applications="piv")
    assert cc.applications_of(cc.load(home)) == ("piv",)
    cc.save(home, server="tcp:127.0.0.1:7390", server_key="SHA256:x", serial="alice", applications="pvi")
    with pytest.raises(cc.CardConfigError) as e:
        cc.load(home)
    assert "applications" in str(e.value) and "pvi" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- command-line options


def option_tree() -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """(command words) -> the long spellings of each of its options: every ``vsc`` parser, and the twistd plugins."""
    from vsc import cli
    from vsc.daemon import card_tap
    from vsc.server import tap

    tree: dict[tuple[str, ...], list[tuple[str, ...]]] = {}

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, path + (name,))
            elif action.help is not argparse.SUPPRESS:
                longs = tuple(o for o in action.option_strings if o.startswith("--") and o != "--help")
                if longs:
                    tree.setdefault(path, []).append(longs)
            tree.setdefault(path, [])

    for name in cli.SUBCOMMANDS:
        top = cli.build_parser(name)
        sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
        walk(sub.choices[name], (name,))
    for plugin, options in (("vsc-card", card_tap.Options), ("vsc-server", tap.Options)):
        rows = list(getattr(options, "optParameters", [])) + list(getattr(options, "optFlags", []))
        tree[(plugin,)] = [("--" + row[0],) for row in rows]
    return tree


def doc_sections() -> list[str]:
    return [s for page in DOCS for s in re.split(r"\n(?=#+ )", page.read_text())]


def mentions(text: str, option: str) -> bool:
    return re.search(re.escape(option) + r"(?![\w-])", text) is not None


def test_every_option_is_documented_with_its_command():
    """
    The pages are the user's manual: every option of every ``vsc`` command
    and of ``twistd vsc-card`` / ``vsc-server`` is explained in a section
    that names its command. ``vsc card passwd`` (changing the card's
    password, and its --password-file / --new-password-file), ``--totp`` /
    ``--totp-file`` (how an insert, recover or destroy gives the TOTP code
    a server with ``impl_auth = totp`` asks for), ``enroll --force``,
    ``ssh-pubkey --slot``, ``twistd vsc-card --ssh-agent`` and the options
    of ``vsc demo`` and ``vsc bench`` were in no page. Now each option is in
    a section that also names its command (``--json``, which every command
    takes, aside).
    """
    sections = doc_sections()
    missing = []
    for path, options in option_tree().items():
        word = re.compile(r"(?<![\w-])" + re.escape(path[-1]) + r"(?![\w-])")
        for spellings in options:
            if "--json" in spellings:
                continue
            if not any(word.search(s) and any(mentions(s, o) for o in spellings) for s in sections):
                missing.append(f"{' '.join(path)} {spellings[0]}")
    assert not missing, ("options no section of README.md / docs/*.md explains with their command:\n"
                         + "\n".join(missing))


def test_every_documented_vsc_option_exists():
    """
    Every ``vsc ... --option`` the pages show (in a console example, a
    code span or a quick-reference table) is an option of that command or
    of one it belongs to (``vsc card --home H status``): a renamed or
    removed option cannot stay in the manual.
    """
    tree = option_tree()
    known = {path: {o for spellings in opts for o in spellings} | {"--help", "--json"} for path, opts in tree.items()}
    bad = []
    for page in DOCS:
        text = page.read_text()
        spans = re.findall(r"`([^`\n]+)`", text) + [
            m.replace("\\\n", " ") for m in re.findall(r"^(?:\$ )?(vsc .*(?:\\\n.*)*)", text, re.M)]
        for span in spans:
            for command in re.split(r"[|;&(]", span):
                words = command.split()
                if "vsc" not in words:
                    continue
                paths, opts = [()], []
                for w in words[words.index("vsc") + 1:]:
                    if w.startswith("--"):
                        opts.append(w.split("=")[0])
                    elif w.startswith(("\"", "'")):
                        break  # a quoted command line of another program (conformance --card-command "...")
                    else:  # "sign/decrypt/cert": any of them
                        longer = [p + (a,) for p in paths for a in w.split("/") if p + (a,) in tree]
                        paths = longer or paths
                if paths == [()]:
                    continue
                allowed = set().union(*(known[p[:i]] for p in paths for i in range(1, len(p) + 1)))
                bad += [f"{page.name}: vsc {' '.join(paths[0])} {o}" for o in opts
                        if re.fullmatch(r"--[a-z][a-z0-9-]*", o) and o not in allowed]
    assert not bad, "documented options that the command does not have:\n" + "\n".join(sorted(set(bad)))


# ---------------------------------------------------------------- exit statuses


def documented_statuses(page: str, heading: str) -> dict[int, str]:
    rows = {}
    for line in section(ROOT / "docs" / page, heading).splitlines():
        m = re.match(r"^\| (\d+) \| (.*) \|$", line)
        if m:
            rows[int(m.group(1))] = m.group(2)
    return rows


@pytest.mark.parametrize("plugin,argv", [
    ("vsc-card", ["--home", "H", "--no-such-option"]),
    ("vsc-card", ["--home"]),
    ("vsc-server", ["--data-dir", "D", "--no-such-option"]),
    ("vsc-server", []),
])
def test_a_bad_option_of_a_twistd_plugin_is_status_2_and_one_line(plugin, argv, capsys):
    """
    docs/card.md's exit-status table of ``twistd vsc-card``: 1 is "insert
    refused", 2 "bad settings or options" (and docs/admin.md §13: the
    server's start-up failures are one line ``vsc-server: ...`` and status
    2). An option the plugin does not know, one without its value, or a
    missing ``--data-dir`` went to twistd's own handling: the whole usage
    text on stdout and exit status 1, so a script watching the status read
    a typo in its unit file as a refused insert. Now the plugin's options
    answer such an error as the documented one line and status 2.
    """
    from twisted.scripts._twistd_unix import ServerOptions

    table = documented_statuses("card.md", "Exit status of `twistd vsc-card`")
    assert "options" in table[2] and "refused" in table[1]
    with pytest.raises(SystemExit) as e:
        ServerOptions().parseOptions(["--nodaemon", plugin, *argv])
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith(f"{plugin}: "), (out, err)


def vsc_status(argv: list[str]) -> int:
    from vsc.cli import main

    try:
        return main(argv)
    except SystemExit as e:  # argparse
        return e.code


@pytest.mark.parametrize("argv", [
    ["run", "--no-such-option", "--", "true"],
    ["run", "--vendor-key", "v.pem", "--", "true"],  # --license missing
    ["run", "--license", "k", "--vendor-key", "v.pem", "--interval", "0", "--", "true"],
    ["run", "--license", "k", "--vendor-key", "v.pem", "--grace", "-1", "--", "true"],
])
def test_vsc_run_bad_options_exit_as_documented(argv, capsys):
    """
    docs/licensing.md's exit codes of ``vsc run``, which a wrapper script
    tells apart from the program's own: the page put "bad options" under
    1 ("anything else"), but an unknown or missing option is argparse's
    usage error, 2, and ``--interval`` / ``--grace`` out of range are
    refused with EXIT_USAGE, 2, on purpose. Now the table's row for bad
    options carries the status they exit with.
    """
    rows = {}
    for line in section(ROOT / "docs" / "licensing.md", "`vsc run`").splitlines():
        m = re.match(r"^\| (\d+)[^|]* \| (.*) \|$", line)
        if m:
            rows[int(m.group(1))] = m.group(2)
    documented = [code for code, meaning in rows.items() if "options" in meaning]
    assert len(documented) == 1, rows
    assert vsc_status(argv) == documented[0], capsys.readouterr().err


# ---------------------------------------------------------------- troubleshooting messages


def code_strings() -> str:
    """Every string literal of vsc's code, an f-string's fields as NUL (so no text spans a field)."""
    out = []
    for path in [*(ROOT / "vsc").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue  # prose, not a message
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
            elif isinstance(node, ast.JoinedStr):
                out.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in node.values))
    return "\n\0".join(out)


#: what a page writes for a value: ..., …, a placeholder (HOME, N, SERIAL), a number or a slot, a quote, a path
PLACEHOLDER = re.compile(r"\.\.\.|…|\b[A-Z][A-Z0-9_]*\b|\b\w*\d\w*\b|['\"/]")
VSC_LINE = re.compile(r"^(?:vsc|vsc-card|vsc-server): ")


def explained(fragment: str, corpus: str, bounded: str) -> bool:
    """
    Whether the code can print ``fragment``: it splits into pieces (a
    message is often built from several: "insert refused: " + the server's
    reason), each either three or more words of one code string, or a
    whole literal part (between two fields or ends: "\0for\0" in ``bounded``).
    """
    words = fragment.split()
    ok = [False] * len(words) + [True]
    for i in range(len(words) - 1, -1, -1):
        for j in range(i + 1, len(words) + 1):
            piece = " ".join(words[i:j])
            if ok[j] and ((j - i >= 3 and piece in corpus) or f"\0{piece.strip(' ,;:()')}\0" in bounded):
                ok[i] = True
                break
    return ok[0]


def test_every_vsc_message_the_pages_quote_is_one_the_code_can_print():
    """
    The troubleshooting tables and the text quote vsc's own one-line
    messages (``vsc: ...``, ``vsc-card: ...``, ``vsc-server: ...``) so a
    user can look up what they see. Each quoted message's text between
    its placeholders must be text the code's strings can make, so a
    reworded message cannot leave its explanation behind (the history's
    lockout wording did, see the first test). A guard: every message quoted
    today passes; rewording one in the code or the page fails it.
    """
    corpus = code_strings()
    bounded = re.sub(r"[\s,;:()]*\0[\s,;:()]*", "\0", corpus)
    bad = []
    for page in DOCS:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S)  # code spans, not blocks
        quoted = [q for q in re.findall(r"`([^`]+)`", text.replace("\n", " ")) if VSC_LINE.match(q)]
        for q in quoted:
            body = VSC_LINE.sub("", q)
            for fragment in (f.strip(" ,;:()") for f in PLACEHOLDER.split(body)):
                if len(fragment) >= 6 and fragment not in corpus and not explained(fragment, corpus, bounded):
                    bad.append(f"{page.name}: {q!r}: {fragment!r}")
    assert not bad, "quoted messages the code cannot print:\n" + "\n".join(bad)
