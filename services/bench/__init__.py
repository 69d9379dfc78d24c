"""Benchmarks behind `specserve bench`: `spec` (speculative decoding per Spec-Bench category) and `lossy`
(relaxed acceptance against lossless on GSM8K). Each prints markdown and rewrites its section of
docs/benchmarks.md; `common` holds what they share (data files, prompts, machine text, doc writing).
"""
