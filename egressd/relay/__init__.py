"""The SMTP relay core, sans-IO: :mod:`~egressd.relay.core`, its events and its replies."""
