"""Device code of fastprune: Triton kernels (*_triton.py) and CUDA kernels (*.cu)."""
