"""
vsc.devtools.process, the supervisor the demo, the integration tests and the
benchmarks share, against real child processes (small Python programs):
readiness waits, the line protocol, SIGTERM then SIGKILL, reaping, and the
child dying with its supervisor.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap

import pytest

from vsc.devtools.process import Child, ProcessFailed, VscServer, exit_text, free_port, port_accepts

from tests.integration import wait_for

PY = sys.executable


def program(tmp_path, name: str, source: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return [PY, str(path)]


def test_wait_line_sees_only_this_start_and_stop_sends_sigterm(tmp_path):
    """wait_line matches a line of this start only (an appended log keeps earlier starts); stop ends it with SIGTERM, not SIGKILL."""
    argv = program(tmp_path, "ready", """
        import sys, time
        print("ready on", sys.argv[1], flush=True)
        time.sleep(60)
    """)
    child = Child([*argv, "first"], tmp_path / "ready.log", append=True)
    child.spawn(banner="start 1")
    assert child.wait_line(r"ready on (\w+)", 30).group(1) == "first"
    assert child.stop() == -signal.SIGTERM and not child.killed
    child.argv = [*argv, "second"]
    child.spawn(banner="start 2")
    assert child.wait_line(r"ready on (\w+)", 30).group(1) == "second"
    child.stop()
    log = child.log_text()
    assert "===== start 1 =====" in log and "===== start 2 =====" in log and "ready on first" in log
    assert child.starts == 2


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path):
    """A child that ignores SIGTERM is SIGKILLed after stop_timeout, reaped, and ``killed`` says so."""
    argv = program(tmp_path, "stubborn", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        time.sleep(60)
    """)
    child = Child(argv, tmp_path / "stubborn.log", stop_timeout=0.5).spawn()
    child.wait_line("ignoring SIGTERM", 30)
    assert child.stop() == -signal.SIGKILL and child.killed
    assert not child.running()
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # already reaped: no zombie left behind
    assert exit_text(child.returncode) == "killed by SIGKILL"


def test_a_child_that_exits_before_it_is_ready_fails_the_wait_with_its_log(tmp_path):
    """wait_until raises ProcessFailed naming the exit status, with the log's tail, as soon as the child has exited."""
    argv = program(tmp_path, "crash", """
        import sys
        print("cannot start: the port is taken", flush=True)
        sys.exit(3)
    """)
    child = Child(argv, tmp_path / "crash.log", name="crasher").spawn()
    with pytest.raises(ProcessFailed) as e:
        child.wait_until(lambda: False, 30, "being ready")
    assert e.value.reason == "crasher ended (exit code 3) before being ready"
    assert "cannot start: the port is taken" in e.value.log


def test_the_wait_times_out_when_the_condition_never_holds(tmp_path):
    """A bounded wait on a child that keeps running raises ProcessFailed saying what did not happen."""
    argv = program(tmp_path, "idle", "import time; time.sleep(60)\n")
    child = Child(argv, tmp_path / "idle.log", name="idler").spawn()
    try:
        with pytest.raises(ProcessFailed, match="idler: no listening on 127.0.0.1:"):
            child.wait_port(free_port(), timeout=0.3)
    finally:
        child.stop()


def test_line_protocol_over_pipes(tmp_path):
    """With pipes, write_line reaches the child's stdin and readline returns its answers one line at a time."""
    argv = program(tmp_path, "echo", """
        import sys
        print("hello", flush=True)
        for line in sys.stdin:
            sys.stdout.write(line.upper() + line.upper())
            sys.stdout.flush()
    """)
    child = Child(argv, tmp_path / "echo.log", pipes=True).spawn()
    assert child.readline(30) == b"hello\n"
    child.write_line(b"abc")
    assert (child.readline(30), child.readline(30)) == (b"ABC\n", b"ABC\n")  # two lines that came in one read
    child.close_stdin()
    assert child.readline(30) is None  # end of output
    assert child.stop(grace=30) == 0 and not child.killed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_children_die_with_their_supervisor(tmp_path):
    """When the supervising process is SIGKILLed (no cleanup runs), the kernel sends its child SIGTERM."""
    child_argv = program(tmp_path, "grandchild", """
        import os, signal, sys, time
        def bye(*_):
            with open(sys.argv[1] + ".part", "w") as f:
                f.write("got SIGTERM")
            os.replace(sys.argv[1] + ".part", sys.argv[1])  # the marker appears whole or not at all
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("up", flush=True)
        time.sleep(60)
    """)
    marker = tmp_path / "marker"
    supervisor_argv = program(tmp_path, "supervisor", f"""
        import time
        from vsc.devtools.process import Child
        c = Child({child_argv + [str(marker)]!r}, {str(tmp_path / "grandchild.log")!r}).spawn()
        c.wait_line("up", 30)
        print("child", c.pid, flush=True)
        time.sleep(60)
    """)
    supervisor = Child(supervisor_argv, tmp_path / "supervisor.log").spawn()
    grandchild = int(supervisor.wait_line(r"child (\d+)", 30).group(1))
    assert running(grandchild)
    supervisor.kill()
    wait_for(marker.exists, 30, "the grandchild's SIGTERM marker")
    assert marker.read_text() == "got SIGTERM"  # written to a side file and renamed: no half-written read
    wait_for(lambda: not running(grandchild), 30, "the grandchild to exit")


def running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_vsc_server_on_port_0_reads_its_port_from_the_log(tmp_path):
    """VscServer with port 0 learns the port the kernel chose from twistd's log; it then accepts connections there."""
    from vsc.server import config

    data = tmp_path / "srv"
    config.init(data, database="", key_bits=2048)
    server = VscServer(data, tmp_path / "server.log").spawn()
    try:
        server.wait_listening(60)
        assert server.port != 0 and server.endpoint == f"tcp:127.0.0.1:{server.port}"
        assert port_accepts(server.port)
        assert not server.port_clash()
    finally:
        assert server.stop() in (0, -signal.SIGTERM) and not server.killed
