from twisted.application.service import ServiceMaker

vscCard = ServiceMaker(
    "VSC card",
    "vsc.daemon.card_tap",
    "A Virtual Smart Card process: inserts the card and serves it while in use",
    "vsc-card",
)
