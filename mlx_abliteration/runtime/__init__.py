"""The compute backend (BLAS, CUDA settings), MLX patches for speed on the CPU, hook points and logging."""
