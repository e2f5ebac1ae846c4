"""The fleet: state shared by several egressd processes and nodes through Redis/Valkey.

- :mod:`egressd.fleet.client`: the Redis client built from ``[state]`` (valkey-glide, on
  trio), with connect and command timeouts, key names under ``[state] prefix``, and one
  error type (:class:`~egressd.fleet.client.RedisUnavailable`) for every failure.

Nothing here is imported unless ``[state] backend = "redis"``: the embedded SQLite backend
needs no Redis client installed (``pip install egressd[redis]`` adds it).
"""
