"""Small pieces the Lightning tests share: a local corpus and a loss recorder."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

WORDS = [
    "the",
    "a",
    "king",
    "queen",
    "castle",
    "river",
    "forest",
    "night",
    "day",
    "speaks",
    "walks",
    "sees",
    "loves",
    "hates",
    "old",
    "young",
    "brave",
    "quiet",
    "storm",
    "light",
    "dark",
    "sword",
    "letter",
    "friend",
    "enemy",
    "home",
    "far",
    "near",
    "under",
    "over",
    "with",
    "and",
    "but",
    "so",
    "then",
    "when",
    "where",
    "while",
    "because",
    "gold",
    "silver",
    "bread",
    "wine",
    "song",
    "tale",
]


def write_corpus(directory: Path, documents: int = 24, words: int = 600, seed: int = 0) -> str:
    """Write generated English-like documents; returns a glob matching them."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(documents):
        sentences = []
        for _ in range(words // 8):
            sentence = " ".join(rng.choice(WORDS) for _ in range(8))
            sentences.append(sentence.capitalize() + ".")
        (directory / f"doc{i:03d}.txt").write_text(" ".join(sentences))
    return str(directory / "*.txt")


class LossRecorder(pl.Callback):
    """Records (global_step, loss) of every training batch."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step - 1] = float(loss)


class StopAt(pl.Callback):
    """Stops training after ``step`` optimizer steps (to simulate an interrupted run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
