"""vsc: a Virtual Smart Card system after EP 0 936 530."""

__version__ = "0.1.0"
