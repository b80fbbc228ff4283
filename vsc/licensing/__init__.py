"""
Licence and copy protection with the Virtual Smart Card as the "digital
ignition key" ([0008], [0017], [0064]-[0065], claim 8): docs/licensing.md.

* vsc.licensing.lcp  the API for protected programs (``from vsc.licensing import lcp``)
* vsc.licensing.run  ``vsc run``: start a program only while the licensed card is inserted
* vsc.licensing.cli  ``vsc license keygen|issue|show|check`` and ``vsc run``

The keyfile logic the card itself needs (verification, counter names,
funding) is protocol-level: vsc.protocol.licence, over vsc.wire.license.
"""
