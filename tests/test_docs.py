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
