from twisted.application.service import ServiceMaker

vscCard = ServiceMaker(
    "VSC card",
    "vsc.card.tap",
    "A Virtual Smart Card process: inserts the card and serves it while in use",
    "vsc-card",
)
