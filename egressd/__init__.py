"""egressd: the egress layer for mail servers.

It decides from which address each outbound SMTP connection leaves, using
KumoMTA's sources.toml schema for sources and pools.
"""

__version__ = "0.1.0"
