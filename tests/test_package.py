"""What a TRL / Liger user looks for in a package: its version, its license matching the metadata, type hints
(py.typed and annotated public functions), and errors that name the argument for inputs of the wrong kind."""

from __future__ import annotations

import inspect
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

import fastpref

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions():
    assert fastpref.__version__ == version("fastpref")


def test_license_file_matches_pyproject():
    license_text = (REPO / "LICENSE").read_text()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text


def test_py_typed_ships_and_public_functions_are_annotated():
    assert (REPO / "fastpref" / "py.typed").exists()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "py.typed" in package_data["fastpref"]
    from fastpref.train import make_config, parse_config, train

    public = [getattr(fastpref, name) for name in fastpref.__all__ if inspect.isfunction(getattr(fastpref, name))]
    public += [make_config, parse_config, train]
    unannotated = []
    for fn in public:
        sig = inspect.signature(fn)
        missing = [p.name for p in sig.parameters.values()
                   if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if missing or sig.return_annotation is inspect.Signature.empty:
            unannotated.append((fn.__name__, missing))
    assert unannotated == []


def test_patch_is_annotated():
    trl = pytest.importorskip("fastpref.integrations.trl")
    sig = inspect.signature(trl.patch)
    assert sig.return_annotation is not inspect.Signature.empty
    assert all(p.annotation is not inspect.Parameter.empty for p in sig.parameters.values())


@pytest.mark.parametrize("call,name", [
    (lambda: fastpref.dpo_loss(1.0, 2.0, 3.0, 4.0), "policy_chosen_logps"),  # was AttributeError: no .device
    (lambda: fastpref.bt_loss(1.0, 2.0), "chosen_rewards"),
    (lambda: fastpref.dpo_loss(torch.zeros(2), [0.0, 1.0], torch.zeros(2), torch.zeros(2)), "policy_rejected_logps"),
])
def test_python_numbers_instead_of_tensors_raise_a_type_error_naming_the_argument(call, name):
    with pytest.raises(TypeError, match=name):
        call()


def test_a_transposed_weight_gets_a_hint():
    hidden, weight = torch.randn(3, 8), torch.randn(50, 8)
    with pytest.raises(ValueError, match=r"weight \(8, 50\) looks transposed: pass the \(V, H\) lm_head.weight"):
        fastpref.linear_token_logps(hidden, weight.T, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="looks transposed"):
        fastpref.linear_sequence_logps(hidden[None], weight.T.contiguous(), torch.tensor([[1, 2, 3]]))
