"""`nibble serve --ray`: the same server, its engines in Ray Serve replicas on many machines.

One process keeps the HTTP layer (server/app.py and server/routes.py, the same code as a
one-process server): it tokenizes, validates, streams and answers errors as `nibble serve`
does. Its engine is `ingress.RayEngine` (a server.async_engine.Requests, as AsyncEngine is), which sends each request through a Ray Serve deployment handle
to a replica (`replica.NibbleReplica`: one process with one nibble engine set, the same
AsyncEngine, metrics and shadow scoring as `nibble serve`). Which replica takes a request is
decided in the ingress by `router.PrefixAffinityRouter`; `live` is the ingress's record of the
replicas that router sees. Ray itself (`pip install 'nibble[cluster]'`) is imported only here.
"""
