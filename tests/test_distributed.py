"""DDP on 2 CPU processes (gloo) trains like 1 process with the same global batch, adapters
switched on mid-run included, and leaves every rank with identical weights and masks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_helpers import write_corpus
from slope_lightning.data import TextDataModule

WORKER = Path(__file__).with_name("ddp_train.py")
TIMEOUT_S = int(os.environ.get("SLOPE_DDP_TEST_TIMEOUT", "240"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(devices: int, batch_size: int, sources: str, cache: str, out: Path) -> None:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["OMP_NUM_THREADS"] = "1"  # two ranks share two cores
    command = [sys.executable, str(WORKER), f"--devices={devices}", f"--batch-size={batch_size}"]
    command += [f"--sources={sources}", f"--cache={cache}", f"--out={out}"]
    # Rank 0 launches rank 1 as its child: run both in a session of their own, so a hang is
    # ended for both (a killed rank 0 would leave rank 1 waiting in a collective).
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{devices}-process training hung for {TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    sources = write_corpus(tmp_path / "docs")
    cache = str(tmp_path / "cache")
    # Prepare data once, so ranks never race on the tokenizer or token files.
    TextDataModule(sources=[sources], cache_dir=cache, vocab_size=300, seq_len=32).prepare_data()
    train(1, 8, sources, cache, tmp_path / "single")
    train(2, 4, sources, cache, tmp_path / "ddp")

    single = json.loads((tmp_path / "single" / "losses0.json").read_text())
    ranks = [json.loads((tmp_path / "ddp" / f"losses{r}.json").read_text()) for r in (0, 1)]
    assert sorted(single, key=int) == sorted(ranks[0], key=int) == [str(s) for s in range(8)]
    # Each rank's loss is the mean over its half of the global batch; their mean is the
    # global loss. Only float summation order differs between the runs (fp32), so the curves
    # agree to ~1e-6 relative; 1e-4 leaves room for 8 steps of drift.
    for step, loss in single.items():
        ddp_loss = (ranks[0][step] + ranks[1][step]) / 2
        assert ddp_loss == pytest.approx(loss, rel=1e-4), f"step {step}"

    state0 = torch.load(tmp_path / "ddp" / "state0.pt")
    state1 = torch.load(tmp_path / "ddp" / "state1.pt")
    reference = torch.load(tmp_path / "single" / "state0.pt")
    assert any(".adapter.up" in k for k in state0), "adapters were not switched on"
    for key, value in state0.items():
        assert torch.equal(value, state1[key]), f"ranks differ in {key}"
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key], rtol=1e-3, atol=1e-4)
        else:
            assert torch.equal(value, reference[key]), f"{key} differs from 1 process"
