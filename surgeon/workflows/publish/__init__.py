"""Publishing to the Hugging Face Hub with a model card that records the surgery."""
