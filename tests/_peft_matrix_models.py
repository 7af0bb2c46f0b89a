"""Small models with the layer names and shapes of PEFT's custom-model test matrix (our own definitions:
only the structure matters for merging, so there is no forward pass)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _module(**children: nn.Module) -> nn.Module:
    model = nn.Module()
    for name, child in children.items():
        setattr(model, name, child)
    return model


class _Weights(nn.Module):
    """A layer that is only parameters (``weight`` stored in × out, ``bias``): peft reaches it through
    ``target_parameters``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        self.bias = nn.Parameter(torch.ones(out_features))


_BUILDERS = {
    "MLP": lambda: _module(lin0=nn.Linear(10, 20), lin1=nn.Linear(20, 2)),
    "MLP2": lambda: _module(lin0=nn.Linear(10, 32), lin1=nn.Linear(32, 2)),
    "MLP_LayerNorm": lambda: _module(layernorm0=nn.LayerNorm(10, 10), lin0=nn.Linear(10, 20),
                                     layernorm1=nn.LayerNorm(20, 20), lin1=nn.Linear(20, 2)),
    "EmbConv1D": lambda: _module(emb=nn.Embedding(100, 5), conv1d=Conv1D(1, 5), lin0=nn.Linear(10, 2)),
    "Conv1d": lambda: _module(conv1d=nn.Conv1d(1, 1, 2), lin0=nn.Linear(9, 2)),
    "Conv1dBigger": lambda: _module(conv1d=nn.Conv1d(64, 16, 2), lin0=nn.Linear(144, 2)),
    "Conv1dGroups": lambda: _module(conv1d=nn.Conv1d(8, 8, 3, groups=2), lin0=nn.Linear(64, 2)),
    "Conv2d": lambda: _module(conv2d=nn.Conv2d(5, 10, 3), lin0=nn.Linear(10, 2)),
    "Conv2d2": lambda: _module(lin0=nn.Linear(10, 40), conv2d=nn.Conv2d(8, 32, 3), lin1=nn.Linear(32, 2)),
    "Conv2d1x1": lambda: _module(conv2d=nn.Conv2d(1, 10, kernel_size=(1, 1)), lin0=nn.Linear(90, 2)),
    "Conv2dGroups": lambda: _module(lin0=nn.Linear(90, 288), conv2d=nn.Conv2d(16, 16, 3, groups=8),
                                    lin1=nn.Linear(16, 2)),
    "Conv2dGroups2": lambda: _module(conv2d=nn.Conv2d(16, 32, 3, padding=1, groups=2), lin0=nn.Linear(12800, 2)),
    "Conv3d": lambda: _module(conv3d=nn.Conv3d(5, 10, 3), lin0=nn.Linear(10, 2)),
    "MHA": lambda: _module(mha=nn.MultiheadAttention(10, 2), lin0=nn.Linear(10, 2)),
    "MlpUsingParameters": lambda: _module(lin0=_Weights(10, 20), lin1=_Weights(20, 2)),
}


def build(model_id: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _BUILDERS[model_id]().float()
