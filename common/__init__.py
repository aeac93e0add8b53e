"""pdserve.common: the records every process shares (sampling params, the KV layout and pool,
sampled tokens). It imports nothing else of pdserve."""
