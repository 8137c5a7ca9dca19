"""Specification of the shared helpers in ``slope_lightning.utils`` that several modules use."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from slope_lightning.utils import load_safetensors, require_finite, unique_tensors


def test_tied_tensors_are_kept_once_and_aliased_to_the_first_name():
    weight = torch.randn(4, 3)
    tensors, aliases = unique_tensors({"wte": weight, "head": weight, "bias": torch.zeros(3)})
    assert sorted(tensors) == ["bias", "wte"]
    assert aliases == {"head": "wte"}
    assert torch.equal(tensors["wte"], weight)


def test_a_view_of_another_dtype_or_an_empty_tensor_is_not_an_alias():
    base = torch.zeros(4, dtype=torch.int32)
    empty_a, empty_b = torch.empty(0), torch.empty(0)
    state = {"ints": base, "floats": base.view(torch.float32), "a": empty_a, "b": empty_b}
    tensors, aliases = unique_tensors(state)
    assert aliases == {}
    assert sorted(tensors) == ["a", "b", "floats", "ints"]


def test_saved_tensors_are_detached_contiguous_copies_on_the_cpu():
    weight = torch.randn(3, 4, requires_grad=True)
    tensors, _ = unique_tensors({"t": weight.t()})
    assert tensors["t"].is_contiguous() and not tensors["t"].requires_grad


def test_a_non_tensor_entry_is_refused_by_name():
    with pytest.raises(TypeError, match="'step' is a dict"):
        unique_tensors({"w": torch.ones(1), "step": {"count": 1}})


def test_require_finite_names_the_first_bad_floating_tensor_and_counts_the_rest():
    state = {
        "ok": torch.ones(2),
        "nan": torch.tensor([0.0, float("nan")]),
        "inf": torch.tensor([float("inf")]),
        "ints": torch.ones(2, dtype=torch.int64),
    }
    with pytest.raises(ValueError, match=r"refusing to save out: nan \(and 1 more\)") as error:
        require_finite(state, "save", "out")
    assert "save the last good checkpoint" in str(error.value)
    require_finite({"ok": torch.ones(2), "ints": torch.ones(1, dtype=torch.int64)}, "save", "x")


def test_a_truncated_safetensors_file_is_a_value_error_with_the_fix(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.ones(64)}, str(path))
    assert torch.equal(load_safetensors(path, "save again")["w"], torch.ones(64))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="may be truncated: save again"):
        load_safetensors(path, "save again")


def test_machine_info_names_the_command_the_code_and_the_device_and_its_footnote_shows_them():
    from slope_lightning.utils import machine_footnote, machine_info

    info = machine_info("slope-lightning study --config x")
    assert info["command"] == "slope-lightning study --config x"
    assert {"code", "torch", "cuda", "triton", "device", "date"} <= set(info)
    footnote = machine_footnote(info)
    assert (
        footnote.startswith(f"device {info['device']} | ")
        and f"torch {torch.__version__}" in footnote
    )
