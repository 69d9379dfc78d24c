"""The router: the public API, continuous batching across requests, and the drafter / verifier pools."""
