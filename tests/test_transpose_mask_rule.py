"""The M_C refresh rule (``slope_lightning.sparse.refresh``): with the default interval every
training forward's backward uses the M_C of the W_R it sees, whatever changed the values
(fused, foreach or plain optimizers, a ``.data`` assignment), with nothing to call; longer
intervals count optimizer steps through ``follow_optimizer`` and refuse to train without it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from slope_lightning.sparse import SparseLinear, follow_optimizer
from slope_lightning.sparse.kernel_ops import derive_col_index

Optimizer = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]

OPTIMIZERS: dict[str, Optimizer] = {
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.5, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=0.5, foreach=True),
    "adamw-plain": lambda params: torch.optim.AdamW(params, lr=0.5, foreach=False),
    "sgd": lambda params: torch.optim.SGD(params, lr=2.0),
}


def make_layer(seed: int = 0, interval: int | None = 1) -> SparseLinear:
    torch.manual_seed(seed)
    return SparseLinear(32, 64, transpose_mask_interval=interval)


def expected_col_index(layer: SparseLinear) -> Tensor:
    """M_C derived from the layer's current W_R, independently of the layer's own state."""
    return derive_col_index(layer.values.detach(), layer.row_index, layer.layout, "torch")


def train_step(layer: SparseLinear, optimizer: torch.optim.Optimizer, x: Tensor) -> None:
    layer(x).pow(2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_after_a_step_the_next_training_forward_uses_the_mc_of_the_new_w_r(name):
    # The trap: AdamW(fused=True) moves no version counter, so without follow_optimizer the
    # backward kept the M_C of the initial W_R.
    layer = make_layer()
    optimizer = OPTIMIZERS[name](layer.parameters())
    x = torch.randn(16, 32)
    initial = layer.col_index.clone()
    for _ in range(3):
        train_step(layer, optimizer, x)
        layer(x)  # the training forward of the next step
        assert torch.equal(layer.col_index, expected_col_index(layer))
    assert not torch.equal(layer.col_index, initial), "the test needs M_C to move"


def test_the_backward_uses_the_mc_of_the_w_r_its_forward_saw():
    layer = make_layer()
    optimizer = OPTIMIZERS["adamw-fused"](layer.parameters())
    x = torch.randn(16, 32)
    train_step(layer, optimizer, x)
    reference = make_layer(seed=1, interval=None)
    reference.load_state_dict(layer.state_dict())
    reference.refresh_transpose_mask()  # by hand, from the new W_R
    grads = []
    for module in (layer, reference):
        x_in = x.clone().requires_grad_()
        module(x_in).pow(2).sum().backward()
        grads.append(x_in.grad)
    assert torch.equal(grads[0], grads[1])


def test_a_data_assignment_is_followed_by_the_next_training_forward():
    layer = make_layer()
    initial = layer.col_index.clone()
    with torch.no_grad():
        layer.values.data = torch.randn_like(layer.values)  # no optimizer, no version bump
    layer(torch.randn(4, 32, requires_grad=True))
    assert torch.equal(layer.col_index, expected_col_index(layer))
    assert not torch.equal(layer.col_index, initial)


def test_inference_forwards_leave_mc_alone():
    layer = make_layer()
    col_index = layer.col_index
    with torch.no_grad():
        layer.values.mul_(-1.0).add_(torch.randn_like(layer.values))
        layer(torch.randn(4, 32))
    assert layer.col_index is col_index


def reference_training(
    make_optimizer: Optimizer, x: Tensor, steps: int, micro_batches: int
) -> tuple[SparseLinear, list[Tensor]]:
    """The layer trained as before this rule, where it was right: M_C re-derived by hand once
    per optimizer step, after the step (what the version counter did for a plain optimizer)."""
    layer = make_layer(interval=None)
    optimizer = make_optimizer(layer.parameters())
    seen = []
    for _ in range(steps):
        for chunk in x.chunk(micro_batches):
            layer(chunk).pow(2).sum().backward()
            seen.append(layer.col_index.clone())
        optimizer.step()
        optimizer.zero_grad()
        layer.refresh_transpose_mask(with_stats=False)
    return layer, seen


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_training_is_bit_identical_to_one_refresh_per_step(name, micro_batches):
    # With gradient accumulation every micro-batch forward re-derives M_C from the same W_R,
    # which gives the M_C of a single refresh per optimizer step, bit for bit.
    x = torch.randn(24, 32)
    steps = 4
    expected, expected_seen = reference_training(OPTIMIZERS[name], x, steps, micro_batches)
    layer = make_layer()
    optimizer = OPTIMIZERS[name](layer.parameters())
    seen = []
    for _ in range(steps):
        for chunk in x.chunk(micro_batches):
            layer(chunk).pow(2).sum().backward()
            seen.append(layer.col_index.clone())
        optimizer.step()
        optimizer.zero_grad()
    for got, want in zip(seen, expected_seen, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(layer.values, expected.values)
    assert torch.equal(layer.bias, expected.bias)


def test_an_interval_counts_the_steps_follow_optimizer_reports():
    layer = make_layer(interval=3)
    optimizer = OPTIMIZERS["adamw-fused"](layer.parameters())
    follow_optimizer(layer, optimizer)
    x = torch.randn(16, 32)
    refreshed_at = []
    for _ in range(7):
        before = layer.col_index
        for _ in range(2):  # gradient accumulation: two forwards per step
            layer(x).pow(2).sum().backward()
        refreshed_at.append(layer.col_index is not before)
        if refreshed_at[-1]:
            assert torch.equal(layer.col_index, expected_col_index(layer))
        optimizer.step()
        optimizer.zero_grad()
    assert refreshed_at == [False, False, False, True, False, False, True]


def test_an_interval_without_a_step_counter_refuses_to_train():
    layer = make_layer(interval=3)
    with pytest.raises(RuntimeError, match=r"transpose_mask_interval=3.*follow_optimizer"):
        layer(torch.randn(4, 32, requires_grad=True))
    with torch.no_grad():
        layer(torch.randn(4, 32))  # inference needs no M_C


def test_mc_held_as_a_parameter_reaches_the_backward_even_if_the_layer_copy_is_regathered():
    # FSDP2 gathers the masks for the forward and again for the backward: a M_C written into
    # the forward's copy is gone by then. Simulated: the copy is overwritten after the forward.
    layer = make_layer()
    layer.hold_masks_as_parameters()
    with torch.no_grad():
        layer.values.mul_(-1.0).add_(torch.randn_like(layer.values))
    stale = layer.col_index.detach().clone()
    reference = make_layer(seed=1, interval=None)
    reference.load_state_dict(layer.state_dict())
    reference.refresh_transpose_mask()
    x = torch.randn(8, 32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = layer(x)
    with torch.no_grad():
        layer.col_index.copy_(stale)  # what a re-gather from un-refreshed shards would do
    y.pow(2).sum().backward()
    reference(x_ref).pow(2).sum().backward()
    assert not torch.equal(stale, reference.col_index), "the test needs M_C to move"
    assert torch.equal(x.grad, x_ref.grad)
