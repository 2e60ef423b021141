"""Fused dequantize-GEMM kernels in Triton: layout.py (the packed layout, plain torch),
qgemm.py (the kernels and launchers), tuning.py (which path serves which batch size)."""
