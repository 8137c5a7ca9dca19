"""The one layer-selection plan: each rule decides once, with its reason, and the one swap
converts each planned layer once, for sparsify, Wanda and every baseline alike."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from slope_lightning.baselines import (
    oneshot_prune,
    srste_sparsify,
    transposable_sparsify,
    wanda_scores,
)
from slope_lightning.baselines.transposable import TransposableSparseLinear
from slope_lightning.sparse import (
    DEFAULT_EXCLUDE,
    BackendName,
    LayerRules,
    SparseLinear,
    SparsityConfig,
    memory_report,
    plan_layers,
    sparsify,
    swap_layers,
    wanda_sparsify,
)
from slope_lightning.sparse.calibration import collect_input_norms


class Conv1D(nn.Module):
    """transformers' Conv1D, written out: a (d_in, d_out) weight and ``x @ W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class LoraWrapper(nn.Module):
    """A PEFT LoRA tuner layer, duck-typed as PEFT's: a base layer and its adapters."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 8, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(8, base.out_features, bias=False)})

    def get_base_layer(self) -> nn.Module:
        return self.base_layer


class EveryRule(nn.Module):
    """One layer for each rule of the plan."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 16)
        self.q_proj = nn.Linear(16, 16)  # converted
        self.c_attn = Conv1D(48, 16)  # a Conv1D: converted by sparsify, not by the baselines
        self.tall = nn.Linear(16, 128)  # aspect ratio 8
        self.odd = nn.Linear(16, 10)  # d_out not divisible by 4
        self.attn = nn.MultiheadAttention(16, 2)  # out_proj read as a bare weight
        self.lm_head = nn.Linear(16, 10, bias=False)  # excluded by default
        self.tied_a = nn.Linear(16, 16)
        self.tied_b = nn.Linear(16, 16)
        self.tied_b.weight = self.tied_a.weight  # a tied weight
        self.adapted = LoraWrapper(nn.Linear(16, 16))  # PEFT
        self.ints = nn.Linear(16, 16).to(torch.float16)
        self.ints.weight = nn.Parameter(torch.ones(16, 16, dtype=torch.int8), requires_grad=False)
        self.sparse = SparseLinear(16, 16)  # already converted


def reasons(report) -> dict[str, tuple[str, str]]:
    return {d.name: (d.decision, d.reason) for d in report.layers}


def test_every_rule_decides_once_with_its_reason():
    found = reasons(plan_layers(EveryRule(), LayerRules(max_aspect_ratio=4)))
    assert found["q_proj"] == ("convert", "to convert")
    assert found["c_attn"] == ("convert", "to convert")
    assert found["tall"] == ("keep", "aspect ratio 8.00 > max_aspect_ratio 4")
    assert found["odd"] == ("keep", "d_in=16 and d_out=10 must both be divisible by m=4")
    assert found["attn.out_proj"][1].startswith("nn.MultiheadAttention reads out_proj.weight")
    assert found["lm_head"] == ("keep", "excluded by pattern 'lm_head'")
    assert found["tied_a"] == ("keep", "weight shared with tied_b.weight")
    assert found["tied_b"] == ("keep", "weight shared with tied_a.weight")
    assert found["adapted.base_layer"][1].startswith("base layer of the PEFT adapter wrapper")
    assert found["adapted.lora_A.default"][1].startswith("PEFT adapter layer (lora_A of adapted")
    assert found["ints"] == ("keep", "weight dtype torch.int8 is not floating point")
    assert found["sparse"] == ("sparse", "already sparse (2:4)")
    assert "adapted" not in found  # the PEFT wrapper itself is not a layer: its children are


def test_exclude_none_means_the_default_exclusions_and_include_narrows():
    model = EveryRule()
    by_default = reasons(plan_layers(model, LayerRules(exclude=None)))
    assert by_default["lm_head"] == ("keep", "excluded by pattern 'lm_head'")
    assert "lm_head" in DEFAULT_EXCLUDE
    nothing_excluded = reasons(plan_layers(model, LayerRules(exclude=[])))
    assert nothing_excluded["lm_head"][0] == "keep"  # 10 rows: not divisible, but not excluded
    assert "divisible" in nothing_excluded["lm_head"][1]
    only_q = reasons(plan_layers(model, LayerRules(include=["q_*"], exclude=["c_*"])))
    assert only_q["q_proj"] == ("convert", "to convert")
    assert only_q["c_attn"] == ("keep", "excluded by pattern 'c_*'")
    assert only_q["tall"] == ("keep", "not matched by include patterns")


def test_include_names_a_peft_base_layer_to_convert_it():
    found = reasons(plan_layers(EveryRule(), LayerRules(include=["*.base_layer"])))
    assert found["adapted.base_layer"] == ("convert", "to convert")
    assert found["adapted.lora_B.default"][0] == "keep"  # adapters stay dense


@pytest.mark.parametrize(
    ("include", "rule"),
    [
        (["odd"], "divisible by m=4"),
        (["tied_a"], "weight shared with tied_b.weight"),
        (["attn.out_proj"], "MultiheadAttention reads"),
    ],
)
def test_an_included_layer_a_rule_refuses_is_an_error_naming_both(include, rule):
    with pytest.raises(ValueError, match=rf"'{include[0]}' matches include pattern.*{rule}"):
        plan_layers(EveryRule(), LayerRules(include=include))


def test_the_baselines_take_nn_linear_only_and_list_conv1d_with_its_reason():
    found = reasons(plan_layers(EveryRule(), LayerRules(conv1d=False, action="made SR-STE")))
    assert found["c_attn"] == (
        "keep",
        "transformers Conv1D is not an nn.Linear; it cannot be made SR-STE 2:4",
    )


def test_a_bare_layer_is_refused_naming_the_single_layer_call():
    with pytest.raises(ValueError, match="for a single layer use SparseLinear.from_linear"):
        plan_layers(nn.Linear(8, 8), LayerRules())


def test_the_swap_builds_each_planned_layer_once_and_the_plan_becomes_the_report():
    model = EveryRule()
    plan = plan_layers(model, LayerRules())
    built: list[str] = []

    def build(decision):
        built.append(decision.name)
        return nn.Identity()

    assert swap_layers(model, plan, build, tag="test") == ["q_proj", "c_attn", "tall"]
    assert built == ["q_proj", "c_attn", "tall"]
    found = reasons(plan)
    assert found["q_proj"] == ("convert", "converted (test)")
    assert found["c_attn"] == ("convert", "converted (test, Conv1D)")
    assert isinstance(model.q_proj, nn.Identity) and plan.layers[0].module is model.q_proj


def test_every_conversion_selects_the_same_linear_layers():
    expected = ["q_proj", "tall"]  # nn.Linear layers the plan converts (no Conv1D here)

    def converted(convert) -> list[str]:
        model = EveryRule()
        convert(model)
        return [n for n, m in model.named_children() if type(m) not in (nn.Linear, Conv1D)]

    skip = ["embed_tokens", "attn", "adapted", "sparse"]
    for convert in (srste_sparsify, oneshot_prune):
        assert [n for n in converted(convert) if n not in skip] == expected
    reference = converted(lambda m: transposable_sparsify(m, backend="reference"))
    assert [n for n in reference if n not in skip] == expected
    slope = converted(lambda m: sparsify(m, exclude=[*DEFAULT_EXCLUDE, "c_attn"]))
    assert [n for n in slope if n not in skip] == expected


def test_a_failed_include_converts_nothing():
    model = EveryRule()
    with pytest.raises(ValueError, match="'odd' matches include"):
        sparsify(model, include=["q_proj", "odd"])
    assert isinstance(model.q_proj, nn.Linear)


# ---------------------------------------------------------------------- config or keywords


def test_wanda_sparsify_refuses_a_config_and_keywords_together_like_sparsify():
    model = nn.Sequential(nn.Linear(8, 8))
    norms = collect_input_norms(model, [torch.randn(2, 8)])
    with pytest.raises(TypeError, match="wanda_sparsify.*these keywords were given too: m"):
        wanda_sparsify(model, norms, SparsityConfig(), m=4)
    with pytest.raises(TypeError, match="sparsify.*these keywords were given too: exclude"):
        sparsify(model, SparsityConfig(), exclude=[])
    assert len(wanda_sparsify(model, norms, n=2, m=4).converted) == 1


def test_a_setting_keyword_the_function_does_not_take_is_refused_by_name():
    model = nn.Sequential(nn.Linear(8, 8))
    norms = collect_input_norms(model, [torch.randn(2, 8)])
    with pytest.raises(TypeError, match="sparsify.. got unexpected keyword.s. bakend; .*backend"):
        sparsify(model, bakend="reference")  # type: ignore[call-arg]
    # Wanda's mask is its own: mask_method is sparsify's keyword only.
    with pytest.raises(TypeError, match="wanda_sparsify.. got unexpected keyword.s. mask_method"):
        wanda_sparsify(model, norms, mask_method="random")  # type: ignore[call-arg]
    assert isinstance(model[0], nn.Linear)


def test_the_keyword_form_builds_the_config_of_the_config_form():
    by_keywords, by_config = nn.Sequential(nn.Linear(8, 8)), nn.Sequential(nn.Linear(8, 8))
    by_config.load_state_dict(by_keywords.state_dict())
    a = sparsify(by_keywords, n=1, m=4, max_aspect_ratio=2.0, transpose_mask_interval=None)
    config = SparsityConfig(n=1, m=4, max_aspect_ratio=2.0, transpose_mask_interval=None)
    b = sparsify(by_config, config)
    assert a.layers == b.layers
    assert torch.equal(by_keywords[0].values, by_config[0].values)


# ---------------------------------------------------------------------- one of each


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_wanda_scores_are_float32_whatever_the_weight_dtype(dtype):
    weight = torch.randn(4, 8).to(dtype)
    norms = torch.rand(8, dtype=torch.float64) * 100
    scores = wanda_scores(weight, norms)
    assert scores.dtype == torch.float32
    assert torch.equal(scores, weight.float().abs() * norms.float())


def test_the_transposable_baseline_takes_backend_names_of_the_one_list():
    layer = TransposableSparseLinear(8, 8, backend=BackendName.reference)
    assert layer.backend == "reference"
    with pytest.raises(ValueError, match="'emulated'.*choose one of reference, cutlass"):
        TransposableSparseLinear(8, 8, backend="emulated")  # a BackendName it does not run


def test_a_one_shot_prune_takes_a_subset_of_the_mask_methods():
    with pytest.raises(ValueError, match="one-shot method 'random'; choose one of magnitude"):
        oneshot_prune(nn.Sequential(nn.Linear(8, 8)), method="random")


def test_memory_report_tells_persistent_buffers_from_caches_through_the_state_dict():
    model = nn.Linear(4, 4)
    model.register_buffer("kept", torch.zeros(8), persistent=True)
    model.register_buffer("cache", torch.zeros(16), persistent=False)
    report = memory_report(model)
    assert report.bytes["buffers"] == 8 * 4
    assert report.bytes["caches"] == 16 * 4
