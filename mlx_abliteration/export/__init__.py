"""What a run writes: the streaming save, quantized output, adapters, model card, Hub upload, GGUF export."""
