"""sparsify() converts the right layers, explains every skip, and is reversible."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from slope_lightning import densify, sparsify
from slope_lightning.sparse import SparseLinear, sparse_layers


class TinyLM(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"q_proj": nn.Linear(32, 32), "up": nn.Linear(32, 128), "odd": nn.Linear(32, 30)}
            )
            for _ in range(2)
        )
        self.lm_head = nn.Linear(32, 64, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, idx):
        h = self.embed(idx)
        for block in self.blocks:
            h = h + block["q_proj"](h) + block["up"](h)[..., :32]
        return self.lm_head(h)


def decisions(report):
    return {d.name: (d.converted, d.reason) for d in report.layers}


def test_converts_block_linears_and_explains_every_skip():
    model = TinyLM(tie=False)
    report = sparsify(model)
    found = decisions(report)
    assert found["blocks.0.q_proj"] == (True, "converted")
    assert found["blocks.1.up"] == (True, "converted")
    assert found["lm_head"] == (False, "excluded by pattern 'lm_head'")
    assert not found["blocks.0.odd"][0] and "divisible by m=4" in found["blocks.0.odd"][1]
    assert isinstance(model.blocks[0]["q_proj"], SparseLinear)
    assert "converted" in str(report) and "blocks.0.odd" in str(report)


def test_tied_head_is_left_dense_with_its_reason():
    model = TinyLM(tie=True)
    report = sparsify(model, exclude=())
    assert decisions(report)["lm_head"] == (False, "weight shared with embed.weight")


def test_max_aspect_ratio_skips_tall_layers():
    report = sparsify(TinyLM(), max_aspect_ratio=2.0)
    converted, reason = decisions(report)["blocks.0.up"]
    assert not converted and "aspect ratio 4.00 > max_aspect_ratio 2.0" in reason


def test_include_restricts_and_an_included_layer_that_cannot_be_converted_is_an_error():
    report = sparsify(TinyLM(), include=["*q_proj"])
    assert [d.name for d in report.converted] == ["blocks.0.q_proj", "blocks.1.q_proj"]
    with pytest.raises(ValueError, match=r"blocks\.0\.odd.*include pattern '\*odd'.*divisible"):
        sparsify(TinyLM(), include=["*odd"])


def test_is_idempotent():
    model = TinyLM()
    sparsify(model)
    values = model.blocks[0]["q_proj"].values
    report = sparsify(model)
    assert model.blocks[0]["q_proj"].values is values
    assert decisions(report)["blocks.0.q_proj"] == (True, "already sparse (2:4)")


def test_nothing_converted_warns_why():
    model = nn.Sequential(nn.Linear(30, 30))
    with pytest.warns(UserWarning, match="converted no layer.*divisible by m=4"):
        sparsify(model)


def test_model_output_uses_the_pruned_weights_and_trains():
    torch.manual_seed(0)
    model = TinyLM(tie=False)
    sparsify(model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 8))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_state_dict_loads_into_a_freshly_sparsified_model():
    source = TinyLM(tie=False)
    sparsify(source)
    target = TinyLM(tie=False)
    sparsify(target)  # different random init, so different masks until loaded
    target.load_state_dict(source.state_dict())
    idx = torch.randint(0, 64, (2, 5))
    assert torch.equal(source(idx), target(idx))


def test_random_masks_by_seed():
    a, b = TinyLM(tie=False), TinyLM(tie=False)
    b.load_state_dict(a.state_dict())
    sparsify(a, mask_method="random", seed=3)
    sparsify(b, mask_method="random", seed=3)
    assert torch.equal(a.blocks[1]["up"].row_index, b.blocks[1]["up"].row_index)


def test_densify_is_the_inverse_swap():
    model = TinyLM(tie=False)
    sparsify(model)
    idx = torch.randint(0, 64, (2, 5))
    before = model(idx)
    assert densify(model) == ["blocks.0.q_proj", "blocks.0.up", "blocks.1.q_proj", "blocks.1.up"]
    assert not sparse_layers(model)
    torch.testing.assert_close(model(idx), before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"n": 4, "m": 4}, "n < m"), ({"backend": "fast"}, "unknown backend 'fast'")],
)
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sparsify(TinyLM(), **kwargs)


def test_a_bare_linear_is_rejected_with_the_alternative():
    with pytest.raises(ValueError, match="SparseLinear.from_linear"):
        sparsify(nn.Linear(8, 8))


def test_nothing_is_warned_when_something_converts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(TinyLM())
