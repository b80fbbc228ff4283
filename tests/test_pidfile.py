"""
twistd's pid file (issue 13): ``twistd vsc-server`` defaults to
DATA_DIR/twistd.pid and ``twistd vsc-card`` to HOME/twistd.pid instead of
./twistd.pid, so both started from one directory do not collide; an explicit
``--pidfile`` (also an empty one) is kept. The README's walkthrough
(tests/test_docs.py) starts both from one directory for real.
"""

from __future__ import annotations

import os

from twisted.scripts._twistd_unix import ServerOptions

from vsc.server.tap import default_pidfile


def _parse(argv: list[str]) -> ServerOptions:
    config = ServerOptions()
    config.parseOptions(argv)
    return config


def test_the_server_defaults_to_its_data_dir_and_the_card_to_its_home(tmp_path, monkeypatch):
    """No --pidfile: the server's pid file is in --data-dir, the card's in --home (absolute paths)."""
    monkeypatch.setattr("sys.argv", ["twistd", "-n", "vsc-server", "--data-dir", str(tmp_path / "srv")])
    assert _parse(["-n", "vsc-server", "--data-dir", str(tmp_path / "srv")])["pidfile"] == str(tmp_path / "srv" / "twistd.pid")
    monkeypatch.setattr("sys.argv", ["twistd", "-n", "vsc-card", "--home", str(tmp_path / "home")])
    assert _parse(["-n", "vsc-card", "--home", str(tmp_path / "home")])["pidfile"] == str(tmp_path / "home" / "twistd.pid")


def test_the_card_without_home_uses_the_default_home(tmp_path, monkeypatch):
    """No --home: $VSC_HOME's twistd.pid."""
    monkeypatch.setenv("VSC_HOME", str(tmp_path / "h"))
    monkeypatch.setattr("sys.argv", ["twistd", "-n", "vsc-card"])
    assert _parse(["-n", "vsc-card"])["pidfile"] == str(tmp_path / "h" / "twistd.pid")


def test_an_explicit_pidfile_is_kept(tmp_path, monkeypatch):
    """--pidfile=X and --pidfile= (none) win over the plugin's default."""
    argv = ["--pidfile", str(tmp_path / "x.pid"), "-n", "vsc-server", "--data-dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["twistd", *argv])
    assert _parse(argv)["pidfile"] == str(tmp_path / "x.pid")
    argv = ["--pidfile=", "-n", "vsc-server", "--data-dir", str(tmp_path)]
    monkeypatch.setattr("sys.argv", ["twistd", *argv])
    assert _parse(argv)["pidfile"] == ""


def test_default_pidfile_reads_the_given_argv():
    """default_pidfile leaves twistd.pid alone when argv names --pidfile, and replaces it otherwise."""

    class Sub(dict):
        parent = None

    sub = Sub()
    sub.parent = {"pidfile": "twistd.pid"}
    default_pidfile(sub, "/d/twistd.pid", argv=["--pidfile=twistd.pid", "vsc-server"])
    assert sub.parent["pidfile"] == "twistd.pid"
    default_pidfile(sub, "/d/twistd.pid", argv=["vsc-server"])
    assert sub.parent["pidfile"] == os.path.join("/d", "twistd.pid")
