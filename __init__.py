"""pdserve: a prefill/decode disaggregated LLM serving cluster on PaddlePaddle."""

__version__ = "0.1.0"
