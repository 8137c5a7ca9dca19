"""sparsify() converts the right layers, explains every skip, and is reversible."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from slope_lightning import densify, sparsify
from slope_lightning.sparse import SparseLinear, sparse_layers
from slope_lightning.sparse.conv1d import is_conv1d
from slope_lightning.sparse.masks import _select_sorted, nm_positions
from slope_lightning.sparse.operations import load_dense_state_dict, prune_dense_state_dict
from slope_lightning.sparse.selection import LayerRules, plan_layers


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


def test_nothing_converted_warning_names_each_reason_not_a_guess():
    # Before: every such warning blamed the include/exclude patterns, whatever the reasons.
    model = nn.Sequential(nn.Linear(30, 30), FancyLinear(8, 8))
    with pytest.warns(UserWarning) as caught:
        sparsify(model)
    message = str(caught[0].message)
    assert "divisible by m=4" in message and "FancyLinear is not an nn.Linear" in message
    assert "include/exclude" not in message


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


# ---------------------------------------------------------------------- linear-like modules


class Conv1D(nn.Module):
    """transformers' Conv1D, written out (same name, attributes and forward), so that these
    tests need no transformers: y = x W + b with W stored (d_in, d_out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class FancyLinear(nn.Module):
    """A linear layer that is not an nn.Linear (as TransformerEngine's or a quantised one)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x):
        return x @ self.weight.t()


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(64, 32)
        self.c_proj = Conv1D(32, 64)

    def forward(self, x):
        return x + self.c_proj(torch.relu(self.c_fc(x)))


def test_conv1d_is_converted_with_its_weight_transposed_and_computes_the_same():
    # Before: GPT-2's Conv1D layers were silently not sparsified (and missing from the report).
    torch.manual_seed(0)
    model = GPT2Block()
    report = sparsify(model)
    assert decisions(report) == {
        "c_fc": (True, "converted (Conv1D)"),
        "c_proj": (True, "converted (Conv1D)"),
    }
    assert [(d.out_features, d.in_features) for d in report.layers] == [(64, 32), (32, 64)]
    layer = model.c_fc
    assert isinstance(layer, SparseLinear) and layer.weight_layout == "conv1d"

    reference = GPT2Block()  # the Conv1D model holding the pruned weights
    with torch.no_grad():
        for name in ("c_fc", "c_proj"):
            sparse = model.get_submodule(name)
            conv = reference.get_submodule(name)
            conv.weight.copy_(sparse.to_dense().t())
            conv.bias.copy_(sparse.bias)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(model(x), reference(x))
    assert (reference.c_fc.weight.t().reshape(64, -1, 4) != 0).sum(-1).le(2).all()  # 2:4 on d_in


def test_from_conv1d_refuses_other_modules_and_is_duck_typed():
    assert is_conv1d(Conv1D(8, 4)) and not is_conv1d(nn.Linear(4, 8))
    with pytest.raises(TypeError, match="from_conv1d takes a transformers Conv1D.*Linear"):
        SparseLinear.from_conv1d(nn.Linear(8, 8))


def test_the_report_lists_every_linear_like_module_left_dense_with_its_reason():
    model = nn.ModuleDict(
        {
            "fancy": FancyLinear(8, 8),
            "attn": nn.MultiheadAttention(16, 2),
            "up": nn.Linear(16, 32),
            "conv": Conv1D(8, 30),
        }
    )
    report = sparsify(model)
    found = decisions(report)
    assert found["up"] == (True, "converted")
    assert found["fancy"] == (
        False,
        "FancyLinear is not an nn.Linear or transformers Conv1D; it cannot be sparsified 2:4",
    )
    assert found["attn.out_proj"] == (
        False,
        "nn.MultiheadAttention reads out_proj.weight directly instead of calling it",
    )
    assert not found["conv"][0] and "d_in=30" in found["conv"][1]
    assert "fancy" in str(report) and "attn.out_proj" in str(report)
    with pytest.raises(ValueError, match=r"'attn\.out_proj'.*MultiheadAttention reads"):
        sparsify(model, include=["attn.*"])


def test_a_multihead_attention_model_still_runs_after_sparsify():
    # Before: out_proj became a SparseLinear, which nn.MultiheadAttention cannot use.
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
    sparsify(layer)
    assert isinstance(layer.linear1, SparseLinear)
    layer(torch.randn(2, 3, 32)).sum().backward()


def test_a_plan_of_nn_linear_only_lists_other_kinds_without_an_include_error():
    model = nn.ModuleDict({"conv": Conv1D(8, 8), "up": nn.Linear(8, 8), "fancy": FancyLinear(8, 8)})
    for include in (None, ["*"]):  # the others are not the baselines' business
        plan = plan_layers(model, LayerRules(include=include, exclude=[], conv1d=False))
        assert [d.name for d in plan.planned] == ["up"]
        assert {d.name: d.decision for d in plan.layers} == {
            "conv": "keep",
            "up": "convert",
            "fancy": "keep",
        }


# ---------------------------------------------------------------------- the weight contract


def test_weight_is_a_read_only_dense_copy_that_warns_once_per_layer():
    # Before: reading .weight raised AttributeError (PEFT, HF utilities, init code).
    layer = SparseLinear.from_linear(nn.Linear(16, 8), name="blocks.0.up")
    with pytest.warns(UserWarning, match=r"'blocks\.0\.up'.*dense \(8, 16\) copy.*to_dense"):
        weight = layer.weight
    assert torch.equal(weight, layer.to_dense())
    assert (weight.dtype, weight.device, weight.shape) == (
        torch.float32,
        layer.values.device,
        (8, 16),
    )
    assert not weight.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = layer.weight  # no second warning
    x = torch.randn(2, 16)
    y = nn.functional.linear(x, again, layer.bias)  # computing with it works
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize(
    "write",
    [
        lambda w: w.data.add_(1.0),  # PEFT's merge
        lambda w: setattr(w, "data", torch.zeros(8, 16)),  # PEFT's safe merge
        lambda w: nn.init.normal_(w),  # user init code
        lambda w: w.copy_(torch.zeros(8, 16)),
        lambda w: w.__setitem__(0, 1.0),
        lambda w: torch.add(w, 1.0, out=w),
    ],
)
def test_writing_into_weight_raises_instead_of_changing_nothing(write):
    layer = SparseLinear.from_linear(nn.Linear(16, 8), name="q")
    before = layer.to_dense()
    with pytest.warns(UserWarning):
        weight = layer.weight
    with pytest.raises(RuntimeError, match=r"layer 'q': SparseLinear.weight is a read-only dense"):
        write(weight)
    assert torch.equal(layer.to_dense(), before)


def test_assigning_weight_raises_with_the_alternatives():
    layer = SparseLinear.from_linear(nn.Linear(16, 8), name="q")
    with pytest.raises(AttributeError, match=r"layer 'q': .*read-only.*values.*from_linear"):
        layer.weight = torch.zeros(8, 16)


# ---------------------------------------------------------------------- dense checkpoints in


class LitLike(nn.Module):
    """What a LightningModule's state dict looks like: the network under ``model.``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyLM(tie=False)

    def forward(self, idx):
        return self.model(idx)


def test_a_dense_lightning_state_dict_loads_into_the_sparse_model_as_sparsify_would_prune_it():
    # Before: load_state_dict failed on the missing values/row_index/col_index keys.
    torch.manual_seed(0)
    dense = LitLike()
    state = {k: v.clone() for k, v in dense.state_dict().items()}  # a dense checkpoint
    with pytest.raises(RuntimeError, match="values"):
        target = LitLike()
        sparsify(target)
        target.load_state_dict(state)

    target = LitLike()
    sparsify(target)  # other random weights, other masks
    result = load_dense_state_dict(target, state)
    assert not result.missing_keys and not result.unexpected_keys

    expected = LitLike()
    expected.load_state_dict(state)
    sparsify(expected)  # the dense checkpoint loaded first, then sparsified
    got, want = target.state_dict(), expected.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    idx = torch.randint(0, 64, (2, 5))
    assert torch.equal(target(idx), expected(idx))


def test_a_dense_conv1d_checkpoint_is_read_in_its_transposed_layout():
    torch.manual_seed(0)
    dense = GPT2Block()
    target = GPT2Block()
    sparsify(target)
    load_dense_state_dict(target, dense.state_dict())
    sparsify(dense)
    for name in ("c_fc", "c_proj"):
        assert torch.equal(target.get_submodule(name).values, dense.get_submodule(name).values)


def test_a_dense_weight_of_the_wrong_shape_is_refused_naming_the_layer():
    target = TinyLM(tie=False)
    sparsify(target)
    state = dict(TinyLM(tie=False).state_dict())
    state["blocks.0.up.weight"] = torch.randn(32, 128)
    with pytest.raises(ValueError, match=r"'blocks\.0\.up'.*shape \(32, 128\).*\(128, 32\)"):
        load_dense_state_dict(target, state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_dense_state_dict_holding_nan_or_inf_is_refused_naming_the_key(bad):
    from slope_lightning.sparse import load_dense_state_dict as public_load

    target = TinyLM(tie=False)
    sparsify(target)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    state = dict(TinyLM(tie=False).state_dict())
    state["blocks.0.up.weight"] = state["blocks.0.up.weight"].clone()
    state["blocks.0.up.weight"][3, 5] = bad
    with pytest.raises(ValueError, match=r"refusing to load .*blocks\.0\.up\.weight.*NaN/inf"):
        public_load(target, state)
    after = target.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before)  # nothing was loaded


def test_strict_loading_still_reports_keys_the_checkpoint_lacks():
    target = TinyLM(tie=False)
    sparsify(target)
    state = dict(TinyLM(tie=False).state_dict())
    del state["blocks.1.q_proj.weight"]
    with pytest.raises(RuntimeError, match=r"blocks\.1\.q_proj\.values"):
        load_dense_state_dict(target, state)
    result = load_dense_state_dict(target, state, strict=False)
    assert "blocks.1.q_proj.values" in result.missing_keys


def test_a_state_dict_with_both_a_dense_weight_and_packed_values_is_refused():
    target = TinyLM(tie=False)
    sparsify(target)
    state = dict(target.state_dict())
    state["blocks.0.up.weight"] = torch.randn(128, 32)
    with pytest.raises(ValueError, match=r"'blocks\.0\.up'.*both a dense.*packed"):
        prune_dense_state_dict(target, state)


# ---------------------------------------------------------------------- the fast mask selection


@pytest.mark.parametrize(("n", "m"), [(1, 2), (1, 3), (2, 3), (1, 4), (2, 4), (3, 4), (2, 5)])
def test_pairwise_selection_chooses_what_a_stable_sort_chooses(n, m):
    generator = torch.Generator().manual_seed(n * 10 + m)
    for _ in range(20):
        w = torch.randint(-2, 3, (6, 7 * m), generator=generator).float()  # many ties
        w[0, :3] = float("nan")
        w[1, 1], w[1, 2], w[2, 0] = float("inf"), float("-inf"), -0.0
        for scores in (w, w.half(), w.double(), w[:, :].nan_to_num().long()):
            groups = scores.reshape(6, 7, m)
            assert torch.equal(nm_positions(scores, n, m), _select_sorted(groups, n, True))
        tall = torch.randint(-2, 3, (3 * m, 5), generator=generator).float()
        transposed = tall.t()  # a strided view, as for M_C
        assert torch.equal(
            nm_positions(transposed, n, m), _select_sorted(transposed.reshape(5, 3, m), n, True)
        )
        seed = int(torch.randint(0, 1000, (1,), generator=generator))
        random = nm_positions(w, n, m, "random", torch.Generator().manual_seed(seed))
        keys = torch.rand((6, 7, m), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(random, _select_sorted(keys, n, False))


# ---------------------------------------------------------------------- speed


def test_two_four_masks_are_chosen_without_a_sort(monkeypatch):
    """A stable sort per group of 4 (done twice per layer) was most of sparsify's time."""

    def no_sort(*args, **kwargs):
        raise AssertionError("torch.sort called")

    w = torch.randn(64, 96)
    expected = _select_sorted(w.reshape(64, 24, 4), 2, True)
    monkeypatch.setattr(torch, "sort", no_sort)
    assert torch.equal(nm_positions(w, 2, 4), expected)


def test_small_layers_are_converted_on_one_thread_and_the_thread_count_restored(monkeypatch):
    """Every op of a layer's conversion is a parallel region, which waits for a time slice when
    the cores are busy: 70 s instead of 6 s for a 135M model on 2 shared cores."""
    seen = []
    original = SparseLinear.from_linear.__func__

    def spy(cls, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(SparseLinear, "from_linear", classmethod(spy))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sparsify(TinyLM(tie=False))
        assert seen == [1, 1, 1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("name", "home"),
    [
        ("load_dense_state_dict", "slope_lightning.sparse.operations"),
        ("prune_dense_state_dict", "slope_lightning.sparse.operations"),
        ("NothingSparsifiedError", "slope_lightning.sparse.selection"),
        ("wanda_sparsify", "slope_lightning.sparse.calibration"),
        ("collect_input_norms", "slope_lightning.sparse.calibration"),
        ("calibrate_and_sparsify", "slope_lightning.sparse.calibration"),
    ],
)
def test_user_facing_functions_are_importable_from_the_sparse_package(name, home):
    """What the README uses is ``from slope_lightning.sparse import ...``, not a deep path."""
    import importlib

    import slope_lightning.sparse as package

    assert name in package.__all__
    assert getattr(package, name) is getattr(importlib.import_module(home), name)
