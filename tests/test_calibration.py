"""Wanda masks: |W|·‖X‖ per input channel, N:M within each row group, original values kept."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from slope_lightning.sparse import SparseLinear, SparsityConfig, sparse_layers, sparsify
from slope_lightning.sparse.calibration import (
    calibrate_and_sparsify,
    collect_input_norms,
    wanda_mask,
    wanda_sparsify,
)


def reference_wanda_mask(
    weight: torch.Tensor, inputs: torch.Tensor, n: int, m: int
) -> torch.Tensor:
    """By hand: norms as a loop over channels, then per row and group the n best scores."""
    d_out, d_in = weight.shape
    norms = [math.sqrt(sum(float(x) ** 2 for x in inputs[:, j])) for j in range(d_in)]
    mask = torch.zeros(d_out, d_in, dtype=torch.bool)
    for row in range(d_out):
        for start in range(0, d_in, m):
            scores = [(abs(float(weight[row, j])) * norms[j], j) for j in range(start, start + m)]
            # largest score first; on equal scores the lower column wins
            best = sorted(scores, key=lambda item: (-item[0], item[1]))[:n]
            for _, j in best:
                mask[row, j] = True
    return mask


class TwoLayers(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 12, d_out: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def test_wanda_keeps_a_dominant_input_channel_that_magnitude_drops() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.9, 0.8, 0.1, 1.0, 0.9, 0.8, 0.7]] * 4))
    inputs = torch.randn(64, 8)
    inputs[:, 3] *= 100.0  # channel 3 carries large activations but has the smallest weights
    model = nn.Sequential(linear)
    magnitude = nm_layer(sparsify_copy(model))
    assert not magnitude.layout.mask(magnitude.row_index)[:, 3].any()  # magnitude drops it

    norms = collect_input_norms(model, [inputs[:32], inputs[32:]])
    report = wanda_sparsify(model, norms)
    layer = nm_layer(model)
    kept = layer.layout.mask(layer.row_index)
    assert kept[:, 3].all()  # Wanda keeps it in every row
    assert [d.reason for d in report.converted] == ["converted (wanda)"]


def sparsify_copy(model: nn.Module) -> nn.Module:
    clone = nn.Sequential(nn.Linear(8, 4, bias=False))
    clone.load_state_dict(model.state_dict())
    sparsify(clone)
    return clone


def nm_layer(model: nn.Module) -> SparseLinear:
    layer = model[0]
    assert isinstance(layer, SparseLinear)
    return layer


@pytest.mark.parametrize(("n", "m", "d_in", "d_out"), [(2, 4, 16, 12), (1, 4, 8, 8), (2, 8, 16, 8)])
def test_wanda_mask_and_values_equal_a_hand_written_reference(n, m, d_in, d_out) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(d_in, d_out)
    inputs = torch.randn(3, 5, d_in) * torch.linspace(0.1, 3.0, d_in)  # uneven channels
    expected = reference_wanda_mask(linear.weight.detach(), inputs.reshape(-1, d_in), n, m)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    model = nn.Sequential(linear)

    norms = collect_input_norms(model, [inputs[:2], inputs[2:]])
    torch.testing.assert_close(norms["0"], inputs.reshape(-1, d_in).norm(dim=0))
    assert torch.equal(wanda_mask(weight, norms["0"], n, m), expected)
    wanda_sparsify(model, norms, n, m)
    layer = nm_layer(model)
    assert torch.equal(layer.layout.mask(layer.row_index), expected)
    assert torch.equal(layer.to_dense(), weight * expected)  # original values, bit for bit
    assert torch.equal(layer.bias, bias)


def test_wanda_layers_train_like_magnitude_layers_and_have_a_valid_transposed_mask() -> None:
    torch.manual_seed(2)
    model = TwoLayers()
    batches = [torch.randn(4, 8) for _ in range(3)]
    report = calibrate_and_sparsify(model, batches)
    assert [d.name for d in report.converted] == ["up", "down"]
    for name, layer in sparse_layers(model):
        fresh = SparseLinear(layer.in_features, layer.out_features, weight=layer.to_dense())
        assert torch.equal(layer.col_index, fresh.col_index), name  # M_C from the kept values
    out = model(torch.randn(5, 8))
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_collect_input_norms_restores_modes_and_removes_its_hooks() -> None:
    model = TwoLayers().train()
    model.down.eval()
    collect_input_norms(model, [torch.randn(2, 8)])
    assert model.training and model.up.training and not model.down.training
    assert all(not mod._forward_hooks for mod in model.modules())
    with pytest.raises(RuntimeError, match="boom"):

        def failing(module: nn.Module, batch: object) -> None:
            raise RuntimeError("boom")

        collect_input_norms(model, [torch.randn(2, 8)], forward=failing)
    assert all(not mod._forward_hooks for mod in model.modules())


def test_calibration_batches_in_the_common_shapes_are_fed_as_they_come() -> None:
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.proj(input_ids * attention_mask)

    keywords = Keywords()
    x = torch.randn(2, 3, 8)
    norms = collect_input_norms(keywords, [{"input_ids": x, "attention_mask": torch.ones(1)}])
    torch.testing.assert_close(norms["proj"], x.reshape(-1, 8).norm(dim=0))
    pairs = collect_input_norms(TwoLayers(), [(x, "targets")])
    torch.testing.assert_close(pairs["up"], x.reshape(-1, 8).norm(dim=0))


def test_wanda_follows_sparsify_selection_rules_and_reports_every_layer() -> None:
    class WithHead(TwoLayers):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = nn.Linear(8, 8)
            self.odd = nn.Linear(8, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.odd(self.lm_head(super().forward(x)))

    model = WithHead()
    norms = collect_input_norms(model, [torch.randn(4, 8)])
    report = wanda_sparsify(model, norms, SparsityConfig(n=2, m=4))
    reasons = {d.name: d.reason for d in report.layers}
    assert reasons["up"] == reasons["down"] == "converted (wanda)"
    assert reasons["lm_head"].startswith("excluded by pattern")
    assert "divisible by m=4" in reasons["odd"]
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.odd, nn.Linear)


def test_a_layer_the_calibration_never_reached_is_named_and_nothing_is_converted() -> None:
    model = TwoLayers()
    norms = collect_input_norms(model, [torch.randn(4, 8)], layers=["up"])
    with pytest.raises(ValueError, match=r"no calibration input reached 1 layer.*'down'"):
        wanda_sparsify(model, norms)
    assert not sparse_layers(model)  # checked before any layer was swapped


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: collect_input_norms(m, []), "no calibration batch"),
        (lambda m: collect_input_norms(m, [torch.randn(1, 8)], layers=["nope"]), "nope"),
        (lambda m: wanda_sparsify(m, {"up": torch.ones(3), "down": torch.ones(12)}), "d_in=8"),
        (
            lambda m: calibrate_and_sparsify(m, [torch.randn(1, 8)], SparsityConfig(), n=2),
            "not both",
        ),
    ],
)
def test_bad_calibration_inputs_are_refused(call, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call(TwoLayers())


def test_wanda_on_bfloat16_weights_keeps_their_dtype_and_values() -> None:
    torch.manual_seed(3)
    model = TwoLayers().to(torch.bfloat16)
    weight = model.up.weight.detach().clone()
    x = torch.randn(6, 8, dtype=torch.bfloat16)
    calibrate_and_sparsify(model, [x])
    layer = model.up
    assert isinstance(layer, SparseLinear) and layer.values.dtype == torch.bfloat16
    mask = layer.layout.mask(layer.row_index)
    assert torch.equal(layer.to_dense(), weight * mask)
    assert torch.equal(mask, wanda_mask(weight, x.float().norm(dim=0)))


def test_all_groups_in_a_row_are_independent() -> None:
    """Every N:M group of a row is chosen on its own (no global threshold per row)."""
    weight = torch.tensor([list(itertools.chain([4.0, 3.0, 2.0, 1.0], [0.4, 0.3, 0.2, 0.1]))])
    mask = wanda_mask(weight, torch.ones(8), 2, 4)
    assert mask.tolist() == [[True, True, False, False, True, True, False, False]]


# ------------------------------------------------------------------ transformers' Conv1D (GPT-2)


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers", reason="transformers is in the test extras")
    config = transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0
    )
    torch.manual_seed(4)
    return transformers.GPT2LMHeadModel(config).eval()


def gpt2_batches(count: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randint(0, 128, (2, 16), generator=generator) for _ in range(count)]


CONV1D = [
    f"transformer.h.{i}.{layer}"
    for i in range(2)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def test_conv1d_input_norms_are_taken_over_its_input_channels() -> None:
    """A Conv1D computes x @ W + b with W (d_in, d_out): its channels are x's last dimension."""
    model = tiny_gpt2()
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name in CONV1D}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: inputs[name].append(args[0].detach())
        )
        for name in CONV1D
    ]
    norms = collect_input_norms(model, gpt2_batches())
    for hook in hooks:
        hook.remove()
    assert set(CONV1D) <= set(norms)  # observed beside the nn.Linear head
    for name in CONV1D:
        seen = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[name]])  # (tokens, d_in)
        d_in = model.get_submodule(name).get_parameter("weight").shape[0]
        assert norms[name].shape == (d_in,)
        torch.testing.assert_close(norms[name], seen.norm(dim=0))


def test_wanda_prunes_gpt2_conv1d_as_the_equivalent_linear_and_keeps_its_values() -> None:
    model = tiny_gpt2()
    dense = {
        name: model.get_submodule(name).get_parameter("weight").detach().t().clone()
        for name in CONV1D
    }
    reference = tiny_gpt2()  # the same weights: pruned by hand below
    norms = collect_input_norms(model, gpt2_batches())
    report = wanda_sparsify(model, norms)

    assert [d.name for d in report.converted] == CONV1D
    assert {d.reason for d in report.converted} == {"converted (wanda, Conv1D)"}
    for name, layer in sparse_layers(model):
        weight = dense[name]  # (d_out, d_in): the Conv1D's (d_in, d_out) transposed
        mask = layer.layout.mask(layer.row_index)
        assert torch.equal(mask, wanda_mask(weight, norms[name])), name
        assert torch.equal(layer.to_dense(), weight * mask), name  # original values, exactly
        assert layer.weight_layout == "conv1d"  # a dense export writes a Conv1D back
        with torch.no_grad():
            reference.get_submodule(name).get_parameter("weight").mul_(mask.t())
    ids = gpt2_batches(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_calibrate_and_sparsify_calibrates_and_converts_conv1d_layers() -> None:
    model = tiny_gpt2()
    report = calibrate_and_sparsify(model, gpt2_batches())
    assert [d.name for d in report.converted] == CONV1D
    assert not any(d.converted for d in report.layers if d.name == "lm_head")
