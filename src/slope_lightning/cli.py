"""The ``slope-lightning`` command: LightningCLI over SLoPeModule and TextDataModule.

slope-lightning fit --config configs/tiny.yaml
slope-lightning fit --config configs/tiny.yaml --ckpt_path last     # resume
slope-lightning validate --config configs/tiny.yaml --ckpt_path last
"""

from __future__ import annotations

import logging

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from slope_lightning.data import TextDataModule
from slope_lightning.module import SLoPeModule


class SLoPeCLI(LightningCLI):
    """LightningCLI with the values the model and the data share linked once."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.seq_len", "model.seq_len")
        # The tokenizer decides the vocabulary; known when the data module exists.
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")


def main(args: list[str] | None = None) -> SLoPeCLI:
    """Entry point of the console script; ``args`` allows in-process calls (tests)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return SLoPeCLI(
        SLoPeModule,
        TextDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "slope"},
            }
        },
        args=args,
    )


if __name__ == "__main__":
    main()
