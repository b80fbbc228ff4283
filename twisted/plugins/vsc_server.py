from twisted.application.service import ServiceMaker

vscServer = ServiceMaker(
    "VSC Server",
    "vsc.server.tap",
    "The Virtual Smart Card server (EP 0 936 530)",
    "vsc-server",
)
