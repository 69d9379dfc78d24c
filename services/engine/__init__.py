"""The single-process inference engine: Llama model, paged KV cache, block manager, scheduler, sampler."""
