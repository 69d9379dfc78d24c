"""The target verifier service: the target model, its paged KV cache, and the acceptance rules."""
