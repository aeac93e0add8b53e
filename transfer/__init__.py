"""pdserve.transfer: the prefill/decode data plane.

messages (wire structs + WireCodec), reservations (decode-side KVReservations), progress (per-layer
token counts both ends share), receiver (KVReceiver: check, then write), block_copy (pool copies),
channel (ZMQ Outbox/Inbox, CURVE), transport (KVChunker, KVSender: shm and zmq), endpoint (the
decode node's KVEndpoint), config (TransferConfig).
"""
