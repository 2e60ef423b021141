"""How the ingress picks a replica for each request (Ray Serve request routers).

`PrefixAffinityRouter`: a prompt whose leading KV blocks a replica has already been sent goes
back to that replica, whose prefix cache then holds them, unless it is much busier than the
least busy one (more than `imbalance` requests ahead; several such replicas: the least busy);
otherwise, and for prompts no replica has seen, the less busy of two random replicas (power of
two choices). The router remembers,
per replica, the chained hashes of the whole `block_size`-token blocks of the prompts sent
there (per variant): the same blocks the engine's prefix cache keys on
(engine/block_manager.py), so a match here is a prefix the replica computed (or still
computes). It is a record of where prompts went, not of what the replica still holds: the
replica's cache may have evicted them since; the router forgets a replica's least recently
sent blocks only past `max_blocks`.

`RayDefaultRouter`: Ray Serve's own power-of-two-choices procedure, the baseline the prefix
router is measured against (benchmarks/cluster_routing.py).

Both honour a `replica=` keyword that pins a request to one replica (the ingress scrapes each
replica's /metrics that way) and keep server.cluster.live current. Ray Serve ships these
classes to the ingress by value, so this module imports nothing of nibble's at its top level.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import LocalityMixin, MultiplexMixin, RequestRouter

MAX_PROMPT_BLOCKS = 512  # blocks hashed per prompt at most (8192 tokens at 16 per block)


def block_hashes(token_ids, block_size: int, seed=None) -> list[int]:
    """The chained hash of each whole block: a block's hash names its whole prefix (and the
    `seed`: the variant, whose cache is its own)."""
    out, h = [], hash(seed)
    whole = min(len(token_ids) // block_size, MAX_PROMPT_BLOCKS)
    for i in range(whole):
        h = hash((h, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out


class _Bookkeeping:
    """Pins (`replica=` keyword) and the live-replica record, for any router."""

    def _app(self) -> str:
        return self._deployment_id.app_name

    def _pinned(self, candidates, pending_request):
        pin = pending_request.kwargs.get("replica") if pending_request is not None else None
        if pin is None:
            return None
        return [[r for r in candidates if r.replica_id.unique_id == pin]]

    def update_replicas(self, replicas):
        from server.cluster import live  # the process's module, not the shipped copy

        super().update_replicas(replicas)
        live.update(self._app(), (r.replica_id.unique_id for r in replicas))

    def on_replica_actor_died(self, replica_id):
        from server.cluster import live

        super().on_replica_actor_died(replica_id)
        live.discard(self._app(), replica_id.unique_id)


class PrefixAffinityRouter(_Bookkeeping, RequestRouter):
    """Decides on its own count of each replica's requests: those it chose a replica for and
    that have not completed. Counted at the moment of choosing, so a burst of requests sees
    each earlier choice at once (replicas' queue lengths, probed, lag the burst)."""

    def initialize_state(self, block_size: int = 16, imbalance: int = 4,
                         max_blocks: int = 1 << 17, **kwargs):
        self.block_size, self.imbalance, self.max_blocks = block_size, imbalance, max_blocks
        self._blocks: dict = {}  # replica id -> OrderedDict of block hashes, oldest first
        # request id -> [replica id, when chosen, dispatched]; completion removes it
        self._taken: dict = {}

    def _match(self, replica_id, hashes: list[int]) -> int:
        """How many leading blocks of the prompt were sent to this replica."""
        seen = self._blocks.get(replica_id)
        if not seen:
            return 0
        n = 0
        for h in hashes:
            if h not in seen:
                break
            n += 1
        return n

    def _loads(self) -> dict:
        """Requests per replica; a choice never dispatched (its request was cancelled while
        being routed) stops counting after a minute."""
        now, loads = time.monotonic(), {}
        for rid, (replica, when, dispatched) in list(self._taken.items()):
            if not dispatched and now - when > 60:
                del self._taken[rid]
            else:
                loads[replica] = loads.get(replica, 0) + 1
        return loads

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pinned = self._pinned(candidate_replicas, pending_request)
        if pinned is not None or pending_request is None:
            return pinned or [candidate_replicas]
        rid = pending_request.metadata.internal_request_id
        if self._taken.pop(rid, None) is None:  # first choice for it (not a retry)
            pending_request.future.add_done_callback(
                lambda f: f.cancelled() and self._taken.pop(rid, None))
        load = self._loads()
        least = min(load.get(r.replica_id, 0) for r in candidate_replicas)
        hashes = self._hashes(pending_request)
        match = {r.replica_id: self._match(r.replica_id, hashes) for r in candidate_replicas}
        longest = max(match.values(), default=0)
        near = [r for r in candidate_replicas if longest and match[r.replica_id] == longest
                and load.get(r.replica_id, 0) <= least + self.imbalance]
        pool = near or random.sample(candidate_replicas, min(2, len(candidate_replicas)))
        choice = min(pool, key=lambda r: load.get(r.replica_id, 0))
        # counted and remembered now, so the next request of a burst sees this one
        self._taken[rid] = [choice.replica_id, time.monotonic(), False]
        self._remember(choice.replica_id, hashes)
        rest = sorted((r for r in candidate_replicas if r is not choice),
                      key=lambda r: load.get(r.replica_id, 0))
        return [[choice], rest] if rest else [[choice]]

    def _hashes(self, pending_request) -> list[int]:
        ids = pending_request.kwargs.get("prompt_ids")
        return block_hashes(ids, self.block_size, pending_request.kwargs.get("variant")) \
            if ids else []

    def _remember(self, replica_id, hashes: list[int]) -> None:
        seen = self._blocks.setdefault(replica_id, OrderedDict())
        for h in hashes:
            seen[h] = None
            seen.move_to_end(h)
        while len(seen) > self.max_blocks:
            seen.popitem(last=False)

    def on_request_routed(self, pending_request, replica_id, result):
        """The replica took it: counted until it completes (unless it already has, as a
        request that finished at once may before this call)."""
        taken = self._taken.get(pending_request.metadata.internal_request_id)
        if taken is None:
            return
        if taken[0] != replica_id:  # the choice was full; another rank took it
            self._remember(replica_id, self._hashes(pending_request))
        taken[:] = [replica_id, taken[1], True]

    def on_request_completed(self, replica_id, internal_request_id):
        self._taken.pop(internal_request_id, None)

    def update_replicas(self, replicas):
        super().update_replicas(replicas)
        alive = {r.replica_id for r in replicas}
        for rid in [rid for rid in self._blocks if rid not in alive]:
            del self._blocks[rid]
        for rid in [rid for rid, taken in self._taken.items() if taken[0] not in alive]:
            del self._taken[rid]

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self._blocks.pop(replica_id, None)


class RayDefaultRouter(_Bookkeeping, LocalityMixin, MultiplexMixin, RequestRouter):
    """Ray Serve's default choice (PowerOfTwoChoicesRequestRouter.choose_replicas: two random
    replicas, the shorter queue), with each request matched to its own routing task (not
    FIFO, so that a pinned request reaches its replica)."""

    def initialize_state(self, **kwargs):
        pass

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        pinned = self._pinned(candidate_replicas, pending_request)
        if pinned is not None:
            return pinned
        return await PowerOfTwoChoicesRequestRouter.choose_replicas(self, candidate_replicas,
                                                                    pending_request)
