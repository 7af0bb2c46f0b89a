"""The companion trainer and evaluator: `surgeon finetune` (full, LoRA family, sparse LoRA, HiRA, QLoRA) and `surgeon eval`."""
