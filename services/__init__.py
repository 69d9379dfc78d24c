"""specserve: speculative-decoding LLM serving.

The engine (model, paged KV cache, scheduler, sampler) lives in `specserve.engine`; Triton kernels and
their plain-torch references live in `specserve.kernels`.
"""

__version__ = "0.1.0"
