"""The plain-PyTorch transformer (LLaMA-style or GPT-2-style by config) and its presets."""

from slope_lightning.models.build import build_model
from slope_lightning.models.checkpointing import checkpoint_blocks
from slope_lightning.models.config import TransformerConfig, available_presets
from slope_lightning.models.transformer import KVCache, Transformer

__all__ = [
    "KVCache",
    "Transformer",
    "TransformerConfig",
    "available_presets",
    "build_model",
    "checkpoint_blocks",
]
