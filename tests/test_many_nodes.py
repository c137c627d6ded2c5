"""Two processes that play two nodes, as `srun` starts them on a cluster (gloo on 127.0.0.1, NODE_RANK 0 and 1,
trainer.num_nodes=2): the latent cache encoded half by each, disjoint shards of equal batch counts, and a run
stopped mid-epoch that resumes to where a straight run ends."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.conftest import LDM_TINY, ROOT
from tests.helpers import save_tiny_first_stage


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _two_nodes(tmp_path, name: str, *overrides: str) -> list[str]:
    """run.py on "node" 0 and 1 at once into one run folder; each node's output."""
    run_dir, port = tmp_path / name, _free_port()
    common = [*LDM_TINY, f"model.first_stage={tmp_path / 'vq'}", "trainer.num_nodes=2", "trainer.devices=1",
              "trainer.accelerator=cpu", "trainer.strategy=ddp", "val_every_n_steps=2", "data.source.num_images=20",
              "data.num_val=4", f"paths.root_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}",
              f"hydra.run.dir={run_dir}", f"+callbacks.seen={{_target_: tests.helpers.RecordSeenImages, "
              f"dirpath: '{run_dir}'}}", *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    logs = [tmp_path / f"{name}_node{node}.log" for node in (0, 1)]
    processes = [subprocess.Popen([sys.executable, "run.py", *common], cwd=ROOT, stdout=open(log, "w"),
                                  stderr=subprocess.STDOUT, env={**env, "MASTER_ADDR": "127.0.0.1",
                                                                 "MASTER_PORT": str(port), "NODE_RANK": str(node),
                                                                 "PYTHONUNBUFFERED": "1"})
                 for node, log in zip((0, 1), logs, strict=True)]
    for process in processes:
        process.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
    return outputs


def _unet(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(("unet.", "ema."))}


@pytest.mark.slow
def test_two_nodes_share_the_encoding_and_the_data_and_resume_exactly(tmp_path):
    save_tiny_first_stage("vq", tmp_path / "vq")
    straight = _two_nodes(tmp_path, "straight", "max_steps=6")
    encoded = [re.search(r"(\d+) latents encoded, (\d+) already there \((\d+) by this process of 2\)", out).groups()
               for out in straight]
    assert encoded[0][:2] == encoded[1][:2] == ("20", "0")  # one manifest: every image encoded once ...
    assert int(encoded[0][2]) > 0 and int(encoded[1][2]) > 0  # ... half of them by each node
    assert int(encoded[0][2]) + int(encoded[1][2]) == 20
    seen = [(tmp_path / "straight" / f"seen_rank{rank}.txt").read_text().splitlines() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 * 2  # 6 steps of 2 images on each node
    for epoch in range(3):  # 16 training images: 4 batches of 2 an epoch, 2 on each node, none on both
        indices = [{line.split()[0] for line in lines[4 * epoch : 4 * epoch + 4]} for lines in seen]
        assert len(indices[0]) == len(indices[1]) == 4 and not indices[0] & indices[1]

    _two_nodes(tmp_path, "resumed", "max_steps=3")  # stopped mid-epoch (epoch 1, one batch of two done) ...
    checkpoint = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["ldm_lab"]["step"] == 3
    resumed = _two_nodes(tmp_path, "resumed", "max_steps=6", f"ckpt_path={checkpoint}")  # ... and resumed
    assert all("resuming from" in out and ": 0 latents encoded, 20 already there" in out for out in resumed)
    ours, theirs = _unet(checkpoint), _unet(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
