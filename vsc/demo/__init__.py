"""
``vsc demo``: the end-to-end walk-through behind ``./quickstart demo``.

It does what an administrator and a card owner would do, each program as
its own process, and says what happened at every step:

1. create (or reuse) a demo directory (``$VSC_DEMO_DIR``, default
   ``./vsc-demo/``) and in it a server data directory with ``vsc admin
   init`` (the embedded default database, SQLite, lives there);
2. start ``twistd -n vsc-server`` on 127.0.0.1 (port 7390, or a free one);
3. issue a one-time enrolment code (``vsc admin issue``) and enrol the demo
   card ``demo-card`` with it (``vsc card enroll``: keys made on this
   machine, sealed under a random password kept in a 0600 file). On a rerun
   the card is already enrolled and is simply inserted again; a card left in
   use by a killed demo is first freed with ``vsc card recover``;
4. insert it: start the card process ``twistd -n vsc-card`` (its own home
   and machine-lock directory inside the demo directory) and wait until
   ``vsc card status`` says ``in-use``;
5. sign a message with slot 9a (RSA) and slot 9c (ECDSA) and verify both
   signatures with openssl (or with vsc.crypto when openssl is missing);
6. step a counter on the card (stored on the server before it is
   acknowledged);
7. show what the server knows (``vsc admin show``);
8. (``--channels``) open a channel per modern suite with and without
   forward secrecy, and see a wrong pinned server key refused;
9. stay up and print what to try next until Ctrl-C or SIGTERM
   (``--once``: go on at once), then remove the card (SIGTERM to the card
   process, which uploads it and sets it idle), stop the server, and print
   the card's final state.

This is a command-line program, not library code: it uses subprocess and
polls with time.sleep. Every wait is bounded, and the children are stopped
on every way out (finally, atexit, SIGINT/SIGTERM/SIGHUP; on Linux they also
get SIGTERM if this process dies without cleaning up).

The package:

* ``vsc.demo.steps``: the steps above, in order (``Demo``);
* ``vsc.demo.processes``: the server and card processes and the short
  commands it runs (supervised through vsc.devtools.process);
* ``vsc.demo.guidance``: what it prints: paths and commands as typed from
  here, what to try while it stays up, the closing summary;
* ``vsc.demo.command``: ``cmd_demo`` and its options (``_add_demo_parser``).
"""

from vsc.demo.command import _add_demo_parser, cmd_demo

__all__ = ["cmd_demo", "_add_demo_parser"]
