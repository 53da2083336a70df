"""Model folders, loading through mlx-lm, safetensors and GGUF files, asset resolution and atomic outputs."""
