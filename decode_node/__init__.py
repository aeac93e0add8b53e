"""pdserve.decode_node."""
