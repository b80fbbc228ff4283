"""The twistd plugins' options (``twistd vsc-card``, ``twistd vsc-server``): their errors are the plugins' own."""

from __future__ import annotations

import sys

from twisted.python import usage


class OneLineOptions(usage.Options):
    """
    A plugin's options whose errors are the plugin's own: one line ``PLUGIN:
    ...`` on stderr and exit status 2 (docs/card.md's exit statuses,
    docs/admin.md §13). twistd's handling prints the whole usage and exits
    1, which for ``vsc-card`` is the status of a refused insert.
    """

    plugin = ""

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            sys.stderr.write(f"{self.plugin}: {e} (twistd -n {self.plugin} --help lists the options)\n")
            raise SystemExit(2) from None
