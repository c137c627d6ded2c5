"""Latent-cache encoding by one process against two that each encode their share (issue 21, item 4): the same
images, a fresh cache each time, the same first stage (SD's f8c4 AutoencoderKL, random weights: its cost is
what matters). Under DDP each process has its own device: here one CPU thread each. Before, the first process
encoded alone while the others waited (1 process, 1 thread); now both encode (2 processes, 1 thread each). One
process with both threads is the same machine's whole CPU, for reference.

    make bench        (or: python experiments/bench/bench_encoding.py [--images N] [--side PX])

Writes experiments/bench/results/encoding.md. Each configuration runs twice, alternating; the faster counts.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).resolve().parent / "results" / "encoding.md"


def _first_stage():
    from diffusers import AutoencoderKL

    from ldm_lab.nn.frozen_autoencoder import FrozenAutoencoder

    torch.manual_seed(0)
    blocks = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
    return FrozenAutoencoder(AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=blocks[0],
                                           up_block_types=blocks[1], layers_per_block=2, latent_channels=4))


def _datamodule(data_dir: Path, images: int, side: int):
    from ldm_lab.data.datamodule import ImageDataModule
    from ldm_lab.data.synthetic import SyntheticSource

    return ImageDataModule(SyntheticSource(data_dir, num_images=images, min_side=side, max_side=side + 16),
                           resolution=side, batch_size=8, num_val=8, num_workers=0, downsample_factor=8)


def _encode(rank: int, world_size: int, threads: int, port: int, data_dir: Path, cache_dir: Path, images: int,
            side: int, seconds) -> None:
    from ldm_lab.stages.encoding import Ranks, encode_latent_cache

    torch.set_num_threads(threads)
    ranks = Ranks()
    if world_size > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world_size)

        def all_gather(part):
            parts = [None] * world_size
            dist.all_gather_object(parts, part)
            return parts

        ranks = Ranks(rank, world_size, all_gather, dist.barrier)
    first_stage, datamodule = _first_stage(), _datamodule(data_dir, images, side)
    start = time.perf_counter()
    encode_latent_cache(first_stage, datamodule, cache_dir, torch.device("cpu"), ranks)
    if rank == 0:
        seconds.value = time.perf_counter() - start
    if world_size > 1:
        dist.destroy_process_group()


def timed(world_size: int, threads: int, data_dir: Path, images: int, side: int) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seconds = mp.get_context("spawn").Value("d", 0.0)
    with tempfile.TemporaryDirectory() as cache_dir:
        mp.start_processes(_encode, args=(world_size, threads, port, data_dir, Path(cache_dir), images, side, seconds),
                           nprocs=world_size, start_method="spawn")
    return seconds.value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--side", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        _datamodule(Path(data_dir), args.images, args.side).prepare_data()
        configurations = [(1, 1), (2, 1), (1, 2)]  # (processes, threads each)
        runs = {c: [] for c in configurations}
        for configuration in configurations * 2:
            runs[configuration].append(timed(*configuration, Path(data_dir), args.images, args.side))
            print(f"{configuration[0]} process(es) x {configuration[1]} thread(s): {runs[configuration][-1]:.1f} s",
                  flush=True)
    best = {c: min(times) for c, times in runs.items()}
    lines = ["# Latent-cache encoding: one process against two", "",
             f"{platform.machine()} CPU, {os.cpu_count()} cores; torch {torch.__version__}. {args.images} synthetic "
             f"images at {args.side} px, SD's f8c4 AutoencoderKL encoder (random weights), batches of 8, a fresh "
             f"cache each run; each configuration twice, alternating, the faster kept.", "",
             "| processes | threads each | seconds | images/s | runs (s) |", "|---:|---:|---:|---:|---|",
             *[f"| {p} | {t} | {best[(p, t)]:.1f} | {args.images / best[(p, t)]:.1f} | "
               f"{', '.join(f'{x:.1f}' for x in runs[(p, t)])} |" for p, t in configurations], "",
             f"Two processes of one thread each encode {best[(1, 1)] / best[(2, 1)]:.2f}x as fast as the first process "
             f"alone (what DDP did before: the others waited), and {best[(1, 2)] / best[(2, 1)]:.2f}x as fast as one "
             f"process with both threads."]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
