"""
The server's settings (vsc/server/settings.py): every value is checked at
start, the documented table is the code's, and a bad value stops a real
``twistd vsc-server`` with one line and exit status 2 (issue 11, attack 7).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vsc.server import config as server_config
from vsc.server.settings import SETTINGS, SettingError, validate

DOC = Path(__file__).resolve().parent.parent / "docs" / "admin.md"


def doc_rows() -> dict[str, tuple[str, str]]:
    """name -> (default, accepted) from docs/admin.md §5's table."""
    text = DOC.read_text()
    section = text[text.index("## 5. Settings"):text.index("## 6.")]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = (cells[1].strip("`"), cells[2])
    return rows


def shown(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return "empty" if v == "" else str(v)


def test_the_documented_settings_are_the_code_settings():
    """docs/admin.md §5 lists exactly the settings of vsc/server/settings.py, with their defaults and ranges."""
    rows = doc_rows()
    assert set(rows) == set(SETTINGS), set(rows) ^ set(SETTINGS)
    for name, setting in SETTINGS.items():
        assert rows[name] == (shown(setting.default), setting.accepts), name


def test_defaults_validate():
    """An empty [server] section is valid: every setting takes its default."""
    assert validate({}) == {name: s.default for name, s in SETTINGS.items()}


@pytest.mark.parametrize("name,value,why", [
    ("handshake_timeout", "nan", "must be a finite number"),
    ("handshake_timeout", "inf", "must be a finite number"),
    ("handshake_timeout", "0", "must be from"),
    ("threads", "banana", "is not an integer"),
    ("threads", "0", "must be from"),
    ("lockout_threshold", "-1", "must be from"),
    ("auth_deadline", "-1", "must be from"),
    ("idle_timeout", "1e9", "must be from"),
    ("allow_insecure", "maybe", "must be true or false"),
    ("forward_secrecy", "sometimes", "must be one of off, prefer, require"),
    ("lease_ttl", "inf", "unknown setting 'lease_ttl'"),
    ("lockout_treshold", "3", "unknown setting 'lockout_treshold'"),
])
def test_bad_values_are_one_line_naming_the_setting(name, value, why):
    """Each bad value (wrong type, out of range, not finite, unknown name) is one line that says which and why."""
    with pytest.raises(SettingError) as e:
        validate({name: value}, "DIR/vsc-server.ini")
    text = str(e.value)
    assert "\n" not in text and why in text and text.startswith("DIR/vsc-server.ini: ")


def test_lockout_max_below_base_is_refused():
    """A throttle whose longest delay is shorter than its first makes no sense: refused."""
    with pytest.raises(SettingError, match="lockout_max"):
        validate({"lockout_base": "60", "lockout_max": "30"})


@pytest.mark.parametrize("setting,extra", [("handshake_timeout = nan", []), ("threads = banana", []),
                                           ("lockout_threshold = -1", []), ("threads = 8", ["--threads", "0"])])
def test_a_real_server_refuses_to_start_with_a_bad_value(tmp_path, setting, extra):
    """twistd -n vsc-server with a bad setting (file or --threads) exits 2 with one 'vsc-server:' line, no traceback."""
    data = tmp_path / "srv"
    server_config.init(data, key_bits=2048)
    ini = data / "vsc-server.ini"
    ini.write_text(ini.read_text() + setting + "\n")
    twistd = Path(sys.executable).parent / "twistd"
    proc = subprocess.run([str(twistd), "--pidfile=", "-n", "vsc-server", "--data-dir", str(data),
                           "--listen", "tcp:0:interface=127.0.0.1"] + extra,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vsc-server: "), proc.stderr
    assert "Traceback" not in proc.stderr
