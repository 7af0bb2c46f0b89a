"""Checkpoint input/output: lazy reading, streaming sharded writing, adapters."""

from surgeon.io.adapter import Adapter, AdapterConfig, is_adapter_folder
from surgeon.io.checkpoint import Checkpoint
from surgeon.io.format import TensorInfo
from surgeon.io.writer import CheckpointWriter, TensorSpec, parse_size, plan_shards

__all__ = [
    "Adapter", "AdapterConfig", "Checkpoint", "CheckpointWriter", "TensorInfo", "TensorSpec",
    "is_adapter_folder", "parse_size", "plan_shards",
]
