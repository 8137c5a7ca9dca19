"""Worker for tests/test_distributed.py: trains the small SLoPe model on 1 or N CPU processes.

Run as a script (Lightning's `ddp` strategy re-launches this file for the other ranks). Each
rank writes its per-step losses and its final state dict to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).parent))

from lightning_helpers import LossRecorder
from slope_lightning.callbacks import LazyLoRA, MaskScheduler
from slope_lightning.data import TextDataModule
from slope_lightning.module import OptimizerConfig, SLoPeModule


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--sources", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args()

    pl.seed_everything(11)
    data = TextDataModule(
        sources=[args.sources],
        cache_dir=args.cache,
        vocab_size=300,
        seq_len=32,
        batch_size=args.batch_size,
    )
    module = SLoPeModule(
        preset="tiny",
        vocab_size=300,
        seq_len=32,
        model_overrides={"n_layer": 1, "d_model": 64, "n_head": 2, "n_kv_head": 1},
        optimizer=OptimizerConfig(lr=3e-3, warmup=2),
        export_dir=str(args.out / "export"),
    )
    recorder = LossRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.max_steps,
        callbacks=[MaskScheduler(every=1), LazyLoRA(start=4, rank=4), recorder],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"losses{rank}.json").write_text(json.dumps(recorder.losses))
    state = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save(state, args.out / f"state{rank}.pt")


if __name__ == "__main__":
    main()
