"""DDP through torchrun: 2 CPU processes (gloo) train identical adapters, equal to one process on the global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from ddp_worker import adapted_model, trained
from safetensors.torch import load_file


def test_two_process_ddp_matches_a_single_process_run(tmp_path) -> None:
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parent)}
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(worker), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and len(rank0) == 28
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    single = trained(rank=0, world=1)
    for name, value in single.items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-4, atol=1e-5, msg=name)
    initial = {n: p for n, p in adapted_model().named_parameters() if p.requires_grad}
    assert any(not torch.equal(single[n], initial[n]) for n in single), "training changed nothing"
