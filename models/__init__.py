"""pdserve.models."""
