"""pdserve.prefill_node."""
