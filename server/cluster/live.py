"""The replicas each Ray Serve application's router currently routes to, by application.

A plain module on purpose: Ray Serve ships the router class to this process by value (with a
copy of its own module's globals), so a registry kept in the router's module would be a copy;
one kept here is the process's own, which the ingress reads for /metrics and capacity.
"""

from __future__ import annotations

_replicas: dict[str, tuple[str, ...]] = {}


def update(app: str, replica_ids) -> None:
    _replicas[app] = tuple(sorted(replica_ids))


def discard(app: str, replica_id: str) -> None:
    _replicas[app] = tuple(r for r in _replicas.get(app, ()) if r != replica_id)


def replicas(app: str) -> tuple[str, ...]:
    return _replicas.get(app, ())
