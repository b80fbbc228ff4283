"""
The docs are tested (issue 13): every console block of README.md and docs/*.md
is run by tests/docrun.py or marked illustrative, and every session runs as
the page shows, with real processes (twistd servers and cards on loopback,
pcscd with vpcd, OpenSC, SoftHSM2, sshd) in a scratch directory. Iterate on
one with ``python -m tests.docrun docs/X.md#session``.
"""

from __future__ import annotations

import pytest

from tests import docrun
from tests.integration import missing

SESSIONS = [s for page in docrun.pages() for s in page.sessions.values()]


def test_every_console_block_is_run_or_illustrative():
    """Each console block of README.md and docs/*.md carries a run or an illustrative marker."""
    unmarked = [b.where() for page in docrun.pages() for b in page.blocks if b.console and b.marker is None]
    assert not unmarked, ("console blocks neither run nor marked illustrative "
                          "(add <!-- doc-test: run SESSION --> or <!-- doc-test: illustrative: WHY -->):\n"
                          + "\n".join(unmarked))


def test_every_session_has_blocks_and_known_predecessors():
    """Every session named by a marker has blocks, and an 'after' names an existing session."""
    for s in SESSIONS:
        assert s.blocks, f"{s.key}: a session marker but no run block"
        if s.after:
            docrun.find_session(s.after)


def test_match_exact_and_wildcards():
    """Lines match exactly (trailing blanks aside); '...' in a line is any text; a '...' line is any lines."""
    assert docrun.match(["a b", "c"], ["a b  ", "c"]) is None
    assert docrun.match(["a b"], ["a c"]) == 0
    assert docrun.match(["key SHA256:..."], ["key SHA256:tRbok5+eIo"]) is None
    assert docrun.match(["key SHA256:..."], ["kez SHA256:x"]) == 0
    assert docrun.match(["first", "...", "last"], ["first", "x", "y", "last"]) is None
    assert docrun.match(["first", "...", "last"], ["first", "last"]) is None
    assert docrun.match(["first", "...", "last"], ["first", "x"]) == 2
    assert docrun.match([], []) is None
    assert docrun.match([], ["unexpected"]) == 0
    assert docrun.match(["a.b (c)"], ["a.b (c)"]) is None  # regex characters are literal
    assert docrun.match(["a.b (c)"], ["axb (c)"]) == 0


def test_parse_commands_output_and_continuations():
    """A run block splits into commands (with '\\' and '> ' continuations) and their expected output lines."""
    page = docrun.parse("x.md", "<!-- doc-test: run s -->\n```console\n$ echo a \\\n  b\na b\n$ cat <<EOF\n"
                                "> hi\n> EOF\nhi\n```\n\n<!-- doc-test: illustrative: placeholder -->\n```sh\nvsc X\n```\n")
    cmds = page.sessions["s"].blocks[0].commands()
    assert [c.text for c in cmds] == ["echo a \\\n  b", "cat <<EOF\nhi\nEOF"]
    assert [[t for _, t in c.expected] for c in cmds] == [["a b"], ["hi"]]
    assert [b.marker for b in page.blocks] == ["run", "illustrative"]
    assert page.blocks[1].why == "placeholder"


def test_a_marker_right_under_a_block_marks_that_block():
    """An illustrative marker on the line after a closing fence marks the block above; the next block needs its own."""
    page = docrun.parse("x.md", "```sh\nvsc X\n```\n<!-- doc-test: illustrative: placeholder -->\n\n```sh\nvsc Y\n```\n")
    assert [b.marker for b in page.blocks] == ["illustrative", None]


def test_a_marker_quoted_in_text_is_not_a_marker():
    """Only a comment on a line of its own marks a block; one quoted in a sentence does not."""
    page = docrun.parse("x.md", "Mark it with `<!-- doc-test: run s -->` before a block.\n\n```console\n$ true\n```\n")
    assert page.sessions == {} and page.blocks[0].marker is None


def test_a_mismatch_names_file_line_expected_and_got(tmp_path):
    """A failing page names the file:line of the first differing expected line, what was expected and what came."""
    page = docrun.parse("x.md", "<!-- doc-test: run s -->\n```console\n$ echo one; echo two\none\nthree\n```\n")
    with pytest.raises(docrun.DocError) as e:
        docrun.run_session(page.sessions["s"], scratch=tmp_path)
    text = str(e.value)
    assert text.startswith("x.md:5: `echo one; echo two`")
    assert "'three'" in text and "  two" in text


def test_a_silent_command_must_succeed(tmp_path):
    """A command shown without output fails the page when it exits non-zero."""
    page = docrun.parse("x.md", "<!-- doc-test: run s -->\n```console\n$ false\n```\n")
    with pytest.raises(docrun.DocError, match="exited 1"):
        docrun.run_session(page.sessions["s"], scratch=tmp_path)


@pytest.mark.integration
@pytest.mark.parametrize("session", SESSIONS, ids=[s.key for s in SESSIONS])
def test_doc_session(session, tmp_path):
    """The session's blocks run in order in a scratch directory and print what the page shows."""
    lacking = docrun.missing_needs(session)
    if lacking:
        missing(f"{session.key} needs {', '.join(lacking)}")
    try:
        docrun.run_session(session, scratch=tmp_path)
    except docrun.DocError as e:
        pytest.fail(str(e), pytrace=False)


@pytest.mark.integration
def test_editable_install_finds_the_plugins(tmp_path):
    """
    ``pip install -e .`` (PEP 660, no --config-settings) of a copy of this
    checkout into a new venv, then ``twistd vsc-server --help`` and ``twistd
    vsc-card --help`` print the plugins' usage: tools/build_backend.py makes
    the editable install the compat kind. The venv borrows this venv's
    packages (--no-deps and a .pth), so only the build runs.
    """
    import subprocess
    import sys
    import sysconfig

    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(docrun.ROOT), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        p = docrun.ROOT / name.decode()
        if p.is_file():
            (src / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            (src / name.decode()).write_bytes(p.read_bytes())
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (docrun.Path(purelib) / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    try:
        pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                              "--no-deps", "--no-input", "--disable-pip-version-check", "-q", "-e", str(src)],
                             capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        missing("pip install -e could not build within 300 s (no network or pip cache for setuptools?)")
    if pip.returncode != 0 and "Could not find a version" in pip.stderr + pip.stdout:
        missing(f"pip cannot get the build requirements here: {pip.stderr.strip().splitlines()[-1]}")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    for plugin, usage in (("vsc-server", "vsc-server --data-dir DIR"), ("vsc-card", "vsc-card --home HOME")):
        out = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
                              plugin, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
        assert usage in out.stdout, out.stdout + out.stderr


def test_a_background_command_is_recognised_with_a_trailing_comment():
    """'CMD &' and 'CMD &  # comment' start a service; 'a && b' and a '#' inside quotes do not."""
    assert docrun._background("twistd -n vsc-server >s.log 2>&1 &") == "twistd -n vsc-server >s.log 2>&1 &"
    assert docrun._background("twistd -n vsc-card >c.log 2>&1 &    # also PC/SC") == "twistd -n vsc-card >c.log 2>&1 &"
    assert docrun._background("true && false") is None
    assert docrun._background("echo '# not a comment &'") is None
