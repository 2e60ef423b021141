"""Triton kernels: layout.py (the packed layout, plain torch), qgemm.py (fused dequantize-GEMM
kernels and launchers), tuning.py (which path serves which batch size), paged_attention.py
(decode attention over the paged KV cache), w8a8.py (int8 x int8 GEMM for W8A8)."""
