"""``auto``: per layer and token count, the fastest measured GEMM backend.

Decisions are measured at first use and kept in a :class:`DecisionStore`: in memory, and in
a JSON file only where the caller names one (the Lightning layer puts it inside the run's
own directory), so which GEMM runs never depends on a file outside the run. Under
torch.distributed, rank 0 measures (or reads) and broadcasts, so every rank runs the same
kernels and only one process writes the file.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import fields
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from slope_lightning.sparse.backends.base import OperandCache, SparseBackend, SparseWeight
from slope_lightning.sparse.backends.ops import token_bucket
from slope_lightning.sparse.backends.reference import ReferenceBackend
from slope_lightning.sparse.backends.store import DecisionStore
from slope_lightning.sparse.kernel_ops import (
    KernelChoices,
    derive_col_index,
    kernels_unavailable,
    measure_kernels,
)
from slope_lightning.sparse.layout import NMLayout
from slope_lightning.utils import first_line, median_ms

logger = logging.getLogger(__name__)

#: ``timer(fn, device) -> ms``: how a candidate is timed (injectable for tests).
Timer = Callable[[Callable[[], object], torch.device], float]

#: What a decision is for: a training step (forward, input gradient and the per-step rebuild
#: of every operand) or an inference forward (operands cached between calls).
Phase = Literal["training", "inference"]


class Decision(NamedTuple):
    """What one ``auto`` decision covers."""

    rows: int
    cols: int
    dtype: torch.dtype
    bucket: int  # token_bucket of the token count
    phase: Phase


def phase_of(weight: SparseWeight) -> Phase:
    """A training operand carries no cache key (rebuilt every call); an inference one does."""
    return "training" if weight.key is None else "inference"


def _time_default(fn: Callable[[], object], device: torch.device) -> float:
    return median_ms(fn, device, repeats=10)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class AutoBackend(SparseBackend):
    """Per layer: time every candidate on the real shape and keep the fastest.

    Candidates are the 2:4 backends (tiled or not) that support the layer, and the dense
    GEMM on the masked weight (``reference``): where sparse loses, the layer still trains
    SLoPe-sparse, with dense GEMMs. A training operand (no cache key) is timed with its
    per-step rebuild (compress W_R, build and compress W_RCᵀ) included, since every real
    step pays it; an inference operand (cached) is timed without. On CUDA it then times each
    Triton kernel against the torch composition it replaces and keeps the faster
    (``kernel_ops.measure_kernels``).

    A decision is made at the first call for each operand shape (the training weight, or the
    merged [W_R; Lᵀ] of inference), dtype, token bucket (:func:`token_bucket`) and phase
    (:class:`Decision`): a no-grad forward never decides for training, whose per-step
    rebuild can change the winner. ``choices`` holds every decision; :attr:`running`,
    ``kernels`` and ``reason`` describe the latest.

    A candidate that raises while it is timed (e.g. cuSPARSELt's "operation not supported"
    for a shape on some GPU) is skipped with its error in ``reason``; the dense GEMM on the
    masked weight (``reference``) is always a candidate, so a layer always runs.

    Args:
        candidates: the 2:4 backends to consider.
        store: where decisions are kept (default: memory only).
        timer: how one candidate is timed (default: median of 10 calls).
    """

    name = "auto"
    row_multiple = 32

    def __init__(
        self,
        candidates: list[SparseBackend],
        store: DecisionStore | None = None,
        timer: Timer = _time_default,
    ) -> None:
        self.candidates = candidates
        self.store = store if store is not None else DecisionStore()
        self.timer = timer
        self.choices: dict[Decision, SparseBackend] = {}
        self.choice: SparseBackend | None = None
        self.reason = "not chosen yet (decided at the first forward)"
        self.kernel_reason = "not chosen yet"

    @property
    def kernels(self) -> KernelChoices:  # type: ignore[override]
        """The running decision's kernel choices (all torch before the first forward)."""
        return self.choice.kernels if self.choice is not None else KernelChoices()

    def use_decision_store(self, store: DecisionStore) -> None:
        self.store = store

    @property
    def running(self) -> SparseBackend:
        return self.choice if self.choice is not None else self

    def describe(self) -> str:
        text = f"auto -> {self.choice.name if self.choice is not None else '?'} ({self.reason})"
        if len(self.choices) > 1:  # per operand shape and token bucket
            text += "; all: " + ", ".join(
                f"{key.rows}x{key.cols} T<={key.bucket} {key.phase}: {chosen.name}"
                for key, chosen in self.choices.items()
            )
        return text + f"; kernels {self.kernels.describe()} ({self.kernel_reason})"

    @staticmethod
    def _decision(layout: NMLayout, x: Tensor, phase: Phase) -> Decision:
        """What one decision covers: operand shape, dtype, token bucket and phase."""
        return Decision(layout.rows, layout.cols, x.dtype, token_bucket(x.shape[0]), phase)

    def _key(self, layout: NMLayout, x: Tensor, phase: Phase) -> str:
        device = torch.cuda.get_device_name(x.device) if x.is_cuda else x.device.type
        shape = f"{layout.rows}x{layout.cols}"
        bucket = token_bucket(x.shape[0])
        return f"{device}|torch {torch.__version__}|{shape}|{x.dtype}|T<={bucket}|{phase}"

    def _time(self, backend: SparseBackend, x: Tensor, weight: SparseWeight, grad: Tensor) -> float:
        cache = OperandCache()

        def step() -> None:
            backend.forward(x, weight, None, cache)
            if weight.key is None:  # training: the input gradient too, rebuilt every call
                backend.grad_input(grad, weight, cache)

        return self.timer(step, x.device)

    def _choose_kernels(self, layout: NMLayout, x: Tensor) -> tuple[KernelChoices, str]:
        """Triton kernel or torch composition per step, measured on CUDA and stored."""
        why_not = kernels_unavailable(x.device)
        if why_not is not None:
            return KernelChoices(), f"torch everywhere: {why_not}"
        key = self._key(layout, x, "training") + "|kernels"
        cached = self.store.get(key)
        known = {field.name for field in fields(KernelChoices)}
        if (
            isinstance(cached, dict)
            and set(cached) == known
            and set(cached.values()) <= {"torch", "triton"}
        ):
            return KernelChoices(**cached), f"stored measurement ({self.store.describe()})"
        choices, times = measure_kernels(layout, x.dtype, x.device, tokens=x.shape[0])
        reason = "measured " + ", ".join(
            f"{step} torch {t['torch']:.3f} / triton {t['triton']:.3f} ms"
            for step, t in times.items()
        )
        self.store.put(key, choices.as_dict())
        return choices, reason

    def _measure(
        self, x: Tensor, weight: SparseWeight, usable: dict[str, SparseBackend], skipped: list[str]
    ) -> dict[str, Any]:
        """This process's decision: backend name, kernel choices and the reasons."""
        key = self._key(weight.layout, x, phase_of(weight))
        stored = self.store.get(key)
        if stored in usable:
            best, reason = stored, f"stored measurement ({self.store.describe()})"
        elif len(usable) == 1:
            best, reason = "reference", "dense GEMM on the masked weight; " + "; ".join(skipped)
        else:
            # Timing inputs come from a private generator: a run that measures draws nothing
            # from the global RNG, so it stays bit-identical to one that reads the store.
            generator = torch.Generator(device=x.device).manual_seed(0)
            grad = torch.randn(
                x.shape[0], weight.layout.rows, dtype=x.dtype, device=x.device, generator=generator
            )
            times: dict[str, float] = {}
            failed: list[str] = []
            for name, backend in usable.items():
                try:
                    times[name] = self._time(backend, x.detach(), weight, grad)
                except Exception as error:  # e.g. cuSPARSELt "operation not supported"
                    if name == "reference":  # the fallback itself: nothing left to run
                        raise
                    failed.append(f"{name} failed: {first_line(error, with_type=True)}")
                    logger.warning("auto: candidate %s failed, skipped: %s", name, failed[-1])
            best = min(times, key=times.__getitem__)
            reason = "measured " + ", ".join(f"{n} {t:.3f} ms" for n, t in times.items())
            if failed:
                reason += "; " + "; ".join(failed)
            self.store.put(key, best)
        kernels, kernel_reason = self._choose_kernels(weight.layout, x)
        return {
            "backend": best,
            "kernels": kernels.as_dict(),
            "reason": reason,
            "kernel_reason": kernel_reason,
        }

    def _choose(self, x: Tensor, weight: SparseWeight) -> SparseBackend:
        layout = weight.layout
        usable: dict[str, SparseBackend] = {"reference": ReferenceBackend()}
        skipped = []
        for candidate in self.candidates:
            why = candidate.unsupported(layout, x.dtype, x.device)
            if why is None:
                usable[candidate.name] = candidate
            else:
                skipped.append(f"{candidate.name}: {why}")
        if not _distributed():
            decision = self._measure(x, weight, usable, skipped)
        else:
            # Rank 0 decides for all: a sync point, once per decision.
            box: list[Any] = [None]
            if dist.get_rank() == 0:
                box[0] = self._measure(x, weight, usable, skipped)
            dist.broadcast_object_list(box, src=0)
            decision = box[0]
        self.reason = decision["reason"]
        self.kernel_reason = decision["kernel_reason"]
        chosen = copy.copy(usable[decision["backend"]])  # its own kernel choices
        chosen.kernels = KernelChoices(**decision["kernels"])
        logger.info(
            "auto backend for %dx%d: %s (%s); kernels %s (%s)",
            layout.rows,
            layout.cols,
            chosen.name,
            self.reason,
            chosen.kernels.describe(),
            self.kernel_reason,
        )
        return chosen

    def forward(
        self, x: Tensor, weight: SparseWeight, bias: Tensor | None, cache: OperandCache | None
    ) -> Tensor:
        decision = self._decision(weight.layout, x, phase_of(weight))
        chosen = self.choices.get(decision)
        if chosen is None:
            col_index = weight.col_index
            if col_index is None:  # M_C for timing the backward, derived as the layer derives it
                col_index = derive_col_index(
                    weight.values, weight.row_index, weight.layout, "torch"
                )
            probe = SparseWeight(
                weight.values.detach(),
                weight.row_index,
                weight.layout,
                x.dtype,
                col_index,
                weight.key,
            )
            chosen = self.choices[decision] = self._choose(x, probe)
        self.choice = chosen  # the decision running now: reports, kernels and grad_values
        return chosen.forward(x, weight, bias, cache)

    def grad_input(
        self, grad_out: Tensor, weight: SparseWeight, cache: OperandCache | None
    ) -> Tensor:
        return self._decided(weight.layout, grad_out, "grad_input").grad_input(
            grad_out, weight, cache
        )

    def grad_values(self, grad_out: Tensor, x: Tensor, weight: SparseWeight) -> Tensor:
        return self._decided(weight.layout, grad_out, "grad_values").grad_values(
            grad_out, x, weight
        )

    def _decided(self, layout: NMLayout, grad_out: Tensor, what: str) -> SparseBackend:
        """The decision the training forward of this operand and token count made."""
        chosen = self.choices.get(self._decision(layout, grad_out, "training"))
        if chosen is None:
            raise RuntimeError(
                f"auto backend: {what} for {grad_out.shape[0]} tokens of a "
                f"{layout.rows}x{layout.cols} operand before any forward of that size"
            )
        return chosen
