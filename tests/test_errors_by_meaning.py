"""Errors by meaning: every error surgeon raises on bad input is a SurgeonError *subclass* a caller can
catch by what went wrong, and the CLI prints it as the one line ``Error: <message>`` (exit 1).

The source check reads the syntax tree of every module under surgeon/ (no import, so it sees code that a
test would never reach); the CLI checks run the real commands on small checkpoints written here."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from surgeon import errors
from surgeon.cli.main import cli

PACKAGE = Path(errors.__file__).parent


def _bare_raises(tree: ast.AST) -> list[int]:
    """Line numbers of ``raise SurgeonError`` / ``raise SurgeonError(...)`` / ``raise errors.SurgeonError(...)``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            name = exc.id if isinstance(exc, ast.Name) else exc.attr if isinstance(exc, ast.Attribute) else None
            if name == "SurgeonError":
                found.append(node.lineno)
    return found


def test_the_scan_sees_a_bare_raise():
    sample = "from surgeon.errors import SurgeonError\ndef f():\n    raise SurgeonError('x')\n" \
             "def g():\n    raise errors.SurgeonError\ndef h():\n    raise OptionError('fine')\n"
    assert _bare_raises(ast.parse(sample)) == [3, 5]


def test_no_module_raises_the_bare_base_class():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50  # the scan really walks the package
    offenders = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path in files
                 for line in _bare_raises(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))]
    assert offenders == [], "raise the SurgeonError subclass a caller would catch (surgeon/errors.py): " + ", ".join(offenders)


def test_every_error_class_is_documented_and_a_surgeon_error():
    classes = [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, Exception)]
    assert {"OptionError", "DeviceError", "DependencyError", "IncompatibleInputError"} <= {c.__name__ for c in classes}
    for cls in classes:
        assert issubclass(cls, errors.SurgeonError), cls
        assert cls.__doc__ and cls.__doc__.strip(), f"{cls.__name__} needs a docstring saying when it is raised"


# -- the CLI: the right subclass, and one line ------------------------------------------------------------
def _checkpoint(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "toy", "torch_dtype": "float32"}))
    return folder


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    return _checkpoint(tmp_path / "base", {"layer.proj.weight": torch.randn(8, 8, generator=g),
                                           "layer.norm.weight": torch.ones(8)})


def _lora(folder: Path, *, rank: int, b_columns: int) -> Path:
    """A PEFT LoRA adapter on ``layer.proj`` whose lora_B has ``b_columns`` columns (the rank, when well-formed)."""
    g = torch.Generator().manual_seed(1)
    folder.mkdir()
    save_file({"base_model.model.layer.proj.lora_A.weight": torch.randn(rank, 8, generator=g),
               "base_model.model.layer.proj.lora_B.weight": torch.randn(8, b_columns, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["proj"]}))
    return folder


def _refused(args: list[str], cls: type[errors.SurgeonError], message: str) -> None:
    shown = CliRunner().invoke(cli, args)
    assert (shown.exit_code, shown.output) == (1, f"Error: {message}\n")
    raised = CliRunner().invoke(cli, ["--debug", *args])  # --debug lets the exception itself through
    assert type(raised.exception) is cls, repr(raised.exception)
    assert str(raised.exception) == message


def test_an_unknown_dtype_is_an_option_error(base: Path, tmp_path: Path):
    _refused(["convert", str(base), "-o", str(tmp_path / "out"), "--dtype", "int8"], errors.OptionError,
             "--dtype 'int8' is not a float dtype surgeon writes; use auto, fp32, fp16 or bf16.")
    assert not (tmp_path / "out").exists()


def test_a_non_finite_adapter_weight_is_an_option_error(base: Path, tmp_path: Path):
    adapter = _lora(tmp_path / "ad", rank=2, b_columns=2)
    _refused(["merge", str(base), f"{adapter}:inf", "-o", str(tmp_path / "out")], errors.OptionError,
             f"{adapter}:inf: adapter weight 'inf' is not a finite number; write e.g. {adapter}:0.5.")


@pytest.mark.parametrize("native", ["1", "0"])
def test_lora_factors_of_two_ranks_are_an_adapter_error_on_every_route(base: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch, native: str):
    # before: the native kernel let a ValueError escape, the torch route a RuntimeError from matmul
    monkeypatch.setenv("SURGEON_NATIVE", native)
    adapter = _lora(tmp_path / "ad", rank=4, b_columns=3)
    _refused(["merge", str(base), str(adapter), "-o", str(tmp_path / "out")], errors.AdapterError,
             f"{adapter}: 'base_model.model.layer.proj.lora_B.weight' has 3 columns but "
             "'base_model.model.layer.proj.lora_A.weight' has 4 rows (the rank); the two factors must agree. "
             "Re-save the adapter from the model it was trained on.")
    assert not (tmp_path / "out").exists()


def test_rank_and_energy_together_are_an_option_error(base: Path, tmp_path: Path):
    tuned = _checkpoint(tmp_path / "tuned", {"layer.proj.weight": torch.zeros(8, 8), "layer.norm.weight": torch.ones(8)})
    _refused(["extract-lora", str(tuned), str(base), "-r", "2", "--energy", "0.9", "-o", str(tmp_path / "out")],
             errors.OptionError, "give exactly one of -r/--rank R or --energy F (e.g. -r 16 or --energy 0.99).")


def test_an_unknown_device_is_a_device_error(base: Path, tmp_path: Path):
    _refused(["spectrum", str(base), "--device", "tpu"], errors.DeviceError,
             "--device 'tpu' is not a device surgeon computes on; use auto, cpu, cuda or cuda:N.")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_device_error(base: Path, tmp_path: Path):
    _refused(["spectrum", str(base), "--device", "cuda"], errors.DeviceError,
             "--device cuda: no CUDA device is available to torch here; use --device cpu (or auto).")


def test_a_tuned_model_identical_to_its_base_is_an_incompatible_input(base: Path, tmp_path: Path):
    _refused(["extract-lora", str(base), str(base), "-r", "2", "-o", str(tmp_path / "out")], errors.IncompatibleInputError,
             f"{base}: no tensor changed beyond rounding against {base}, so there is nothing to extract; "
             "check that TUNED and BASE are not the same model.")
