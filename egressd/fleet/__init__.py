"""The fleet: state shared by several egressd processes and nodes through Redis/Valkey.

- :mod:`egressd.fleet.client`: the Redis client built from ``[state]`` (valkey-glide, on
  trio), with connect and command timeouts, key names under ``[state] prefix``, and one
  error type (:class:`~egressd.fleet.client.RedisUnavailable`) for every failure;
- :mod:`egressd.fleet.stores`: the :class:`~egressd.state.Store` the daemon awaits, opened
  from ``[state]`` (the SQLite backend behind a thread shell).

:mod:`egressd.fleet.client` (and so the Redis client library) is imported only with
``[state] backend = "redis"``: the embedded SQLite backend needs no Redis client installed
(``pip install egressd[redis]`` adds it).
"""
