"""pdserve.transfer."""
