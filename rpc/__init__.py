"""pdserve.rpc: the router <-> node gRPC API (node.proto) and its generated modules."""
