"""The one exception hierarchy of surgeon.

Every error a user can cause is a :class:`SurgeonError`. Its message is one
line that names the file or tensor, says what was expected and what was
found, and ends with what to do. The CLI prints it as ``Error: <message>``
and exits 1; library users can catch the subclasses by meaning.
"""

from __future__ import annotations


class SurgeonError(Exception):
    """Base class of every error surgeon raises on bad input or state."""

    exit_code = 1


class CheckpointNotFoundError(SurgeonError):
    """A checkpoint path does not exist or holds no weights."""


class CheckpointFormatError(SurgeonError):
    """A safetensors file or index is malformed, truncated or inconsistent."""


class IncompleteDownloadError(CheckpointFormatError):
    """A weights file is a Git LFS pointer or an HTML page, not safetensors."""


class PickleRefusedError(SurgeonError):
    """Weights stored as pickle (.bin/.pt/.pth/.ckpt): surgeon never unpickles."""


class OutputError(SurgeonError):
    """The output location is unusable (non-empty, on the input, ...)."""


class AdapterError(SurgeonError):
    """An adapter folder is malformed or does not fit the base."""


class UnsupportedAdapterError(AdapterError):
    """An adapter type or configuration surgeon refuses to merge."""


class ShapeMismatchError(SurgeonError):
    """Two tensors that must line up do not."""


class NumericalError(SurgeonError):
    """A computation produced non-finite values or did not converge."""


class HubError(SurgeonError):
    """A Hugging Face Hub operation failed."""


class DistributedError(SurgeonError):
    """A run over several processes failed: a rank raised, died or timed out."""


class DataError(SurgeonError):
    """A training or evaluation data file is unusable."""


class OptionError(SurgeonError):
    """An option or argument has a bad value, is missing, or options that cannot go together were given."""


class DeviceError(OptionError):
    """The ``--device`` asked for is not one surgeon computes on, or is not available to torch here."""


class DependencyError(SurgeonError):
    """An optional package a feature needs is missing, too old, or installed but does not load."""


class IncompatibleInputError(SurgeonError):
    """Inputs that are each well-formed do not fit the command or each other (an encoder given to a
    causal-LM task, a full model continued as an adapter, a fine-tune identical to its base, ...)."""
