"""
Tools for running vsc's own programs from a supervisor: the demo
(vsc.demo), the integration tests (tests/) and the benchmarks (bench/).
Installed with the package, so the demo and the benchmarks need nothing
from tests/.

* ``vsc.devtools.process``: start a program, wait until it is ready (a port,
  a line, any condition), keep its output, stop it for sure (SIGTERM, then
  SIGKILL, always reaped; killed with its parent on Linux); ``VscServer`` is
  ``twistd -n vsc-server`` on loopback.
* ``vsc.devtools.pg``: a private, throw-away PostgreSQL cluster (initdb,
  pg_ctl) on a free loopback port, and fresh databases in it.

Layer L5: imports the standard library (and vsc.util when there is one),
nothing from vsc.cli. This is supervisor code, not protocol code: it reads
the monotonic clock and sleeps while it polls, each marked ``# clock-ok``.
"""
