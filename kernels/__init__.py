"""Triton kernels of mgit_fast, installed as ``mgit_fast.kernels``.

One file per fused operation (DESIGN.md §6): attention, the MGiT loss, and the multi-gradient
AdamW update. Each is reached through ``mgit_fast.functional`` with ``backend="triton"``.
"""
