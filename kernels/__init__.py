"""Attention kernels: each Triton kernel sits beside the plain-torch reference it is tested against.

The CPU serving path runs the torch references; CUDA runs the Triton kernels.
"""
