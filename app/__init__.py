"""mirrorha: two-node high availability with synchronous byte-level mirroring."""

__version__ = "0.1.0"
