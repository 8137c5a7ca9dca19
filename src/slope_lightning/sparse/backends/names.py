"""The names of the GEMM backends: the one list every other module and the CLI read."""

from __future__ import annotations

from enum import Enum


class BackendName(str, Enum):
    """How a SparseLinear runs its forward and input-gradient GEMMs.

    Members are lower case, name equal to value, because LightningCLI (jsonargparse) reads an
    Enum by member name: ``backend: cusparselt_tiled`` in YAML is the same spelling as
    ``sparsify(model, backend="cusparselt_tiled")`` in Python.

    - ``reference``: plain torch on any device and dtype, any N:M (dense GEMMs on the masked
      weight, built transiently).
    - ``cusparselt`` / ``cutlass``: PyTorch's 2:4 sparse GEMMs on a CUDA GPU (fp16/bf16).
    - ``cusparselt_tiled`` / ``cutlass_tiled``: the same, tall operands cut into square row
      tiles (the paper's tiling).
    - ``auto``: per layer and token count, the fastest measured of the above and the dense
      GEMM on the masked weight.
    - ``emulated`` / ``emulated_tiled``: the cuSPARSELt backend's logic (compressed operand
      caches, padding, tiling, dispatch) with dense torch math standing in for the kernels,
      on any device and dtype: how CPU CI runs the GPU code paths end to end, and a way to
      debug them without a GPU. No speedup.
    """

    reference = "reference"
    cusparselt = "cusparselt"
    cusparselt_tiled = "cusparselt_tiled"
    cutlass = "cutlass"
    cutlass_tiled = "cutlass_tiled"
    auto = "auto"
    emulated = "emulated"
    emulated_tiled = "emulated_tiled"

    @classmethod
    def _missing_(cls, value: object) -> BackendName | None:
        # The "+tiled" spelling of releases before the Enum (e.g. "cusparselt+tiled").
        if isinstance(value, str) and value.endswith("+tiled"):
            return cls.__members__.get(value.replace("+tiled", "_tiled"))
        return None

    @classmethod
    def parse(cls, value: str | BackendName) -> BackendName:
        """The member for ``value``, or a ValueError that lists the choices."""
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(member.value for member in cls)
            raise ValueError(f"unknown backend {value!r}; choose one of {choices}") from None

    @property
    def needs_cuda(self) -> bool:
        """Whether this backend runs its GEMMs on a CUDA GPU only."""
        return self not in (BackendName.reference, BackendName.emulated, BackendName.emulated_tiled)

    @property
    def tiled(self) -> bool:
        """Whether tall operands are always cut into square row tiles."""
        return self.value.endswith("_tiled")

    def __str__(self) -> str:
        return self.value
