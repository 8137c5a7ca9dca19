"""Activation checkpointing per transformer block: the one place that applies it.

:class:`~slope_lightning.module.SLoPeModule` (``activation_checkpointing: true``) and the memory
benchmark both call :func:`checkpoint_blocks`, so what they measure is what training runs.

It uses ``torch.distributed._composable.checkpoint``, a private torch module, on purpose: it
checkpoints a module in place through hooks, so parameter names stay unchanged (checkpoints load
with or without it) and it composes with FSDP2's ``fully_shard`` applied afterwards on the same
blocks, as torchtitan does. The public alternatives do not fit: ``torch.utils.checkpoint`` would
move the choice into :meth:`Transformer.forward` (and makes each block with a SparseLinear, which
``torch.compile`` runs eagerly, a graph break of its own), and ``checkpoint_wrapper`` renames
every parameter. ``tests/test_models.py`` fails with a message naming this module if torch moves
or changes it.
"""

from __future__ import annotations

from torch import nn

__all__ = ["checkpoint_blocks"]


def checkpoint_blocks(blocks: nn.ModuleList) -> int:
    """Recompute each of ``blocks`` in the backward instead of keeping its activations
    (non-reentrant; parameter names unchanged). Returns how many blocks were checkpointed."""
    from torch.distributed._composable import checkpoint  # private: see the module docstring

    for block in blocks:
        checkpoint(block)
    return len(blocks)
