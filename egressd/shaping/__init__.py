"""Shaping: per (source x destination) limits and reply-driven rules, from KumoMTA shaping files.

Pure: no trio, no socket, no clock of its own (time is passed in or injected). Not wired into
the doors yet; see README "Shaping (not wired yet)".
"""
