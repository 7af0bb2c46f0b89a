"""Task vectors: diff a fine-tune against its base, check it against its adapter, apply task arithmetic, extract a LoRA."""
