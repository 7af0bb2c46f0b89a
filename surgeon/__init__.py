"""surgeon: model surgery on safetensors checkpoints, tensor by tensor."""

__version__ = "0.1.0"
