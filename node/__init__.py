"""pdserve.node: what every node server runs whatever its role (the gRPC base, the engine client and
the one stream from the engine, request streams, registry heartbeats, metrics)."""
