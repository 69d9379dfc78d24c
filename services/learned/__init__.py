"""Learned draft sources and how they are trained from the target (self-distillation on CPU or CUDA)."""
