"""An input given in the wrong role: a PEFT adapter folder where a model (or task vector) belongs.

Read as a checkpoint, an adapter's tensors (``base_model.model....lora_A.weight``) match none of the
base's, so the command would report "nothing changed" or "not in the base" and blame the wrong thing.
:func:`refuse_adapter` says what the folder is and which command takes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.errors import IncompatibleInputError
from surgeon.io.adapter import is_adapter_folder
from surgeon.io.disk import show


def refuse_adapter(path: str | os.PathLike[str], *, expected: str, fix: str) -> None:
    """Raise when ``path`` is a PEFT adapter folder although ``expected`` (e.g. "a model") belongs there."""
    if is_adapter_folder(Path(path)):
        raise IncompatibleInputError(f"{show(Path(path))}: is a PEFT adapter, not {expected}; {fix}.")
