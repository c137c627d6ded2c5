"""The parity tests' errors (tests/parity.py) under every CPU code path this machine can take, and thread counts.

    python experiments/parity_tolerance/measure.py   # adds this CPU's runs to results.json, prints the table

Each setting runs in a fresh process (the variables are read when torch loads): ATen's vector kernels
(``ATEN_CPU_CAPABILITY``), oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``) and MKL's matmuls
(``MKL_ENABLE_INSTRUCTIONS``) capped one at a time and all together, each at 1, 2 and 4 threads. A cap above
what the CPU has falls back to what it has for oneDNN and MKL; ATen's avx512 kills the process (SIGILL) on a
CPU without AVX-512, so that setting is skipped there. The table says which ATen capability really ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))  # tests.parity
SETTINGS = {
    "as is": {},
    "ATen default (scalar)": {"ATEN_CPU_CAPABILITY": "default"},
    "ATen avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ATen avx512": {"ATEN_CPU_CAPABILITY": "avx512"},  # a CPU without AVX-512 dies of SIGILL: skipped there
    "oneDNN AVX2 + ATen avx2 (CI's second run)": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "oneDNN AVX": {"ONEDNN_MAX_CPU_ISA": "AVX"},
    "oneDNN SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "MKL SSE4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "all oldest": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}
THREADS = (1, 2, 4)
CAPS = {name for variables in SETTINGS.values() for name in variables}  # cleared from the caller's environment


def sampling_scheduler():
    """The DDIM scheduler model=unet samples with (its objective's ``sampling_scheduler``)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ldm_lab.config.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        model = compose(config_name="config", overrides=["model=unet"]).model
    return instantiate(model.objective).sampling_scheduler


def worker(threads: int) -> None:
    """Print one JSON line: the ATen capability that ran and each comparison's error (``parity.error``)."""
    import torch

    from tests import parity

    torch.set_num_threads(threads)
    outputs = {**parity.vq_outputs(), **parity.kl_outputs(), **parity.unet_outputs(),
               **parity.ddim_outputs(sampling_scheduler())}
    errors = {name: parity.error(ours, reference) for name, (ours, reference) in outputs.items()}
    print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "errors": errors}))


def main() -> None:
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    results = []
    for setting, variables in SETTINGS.items():
        if variables.get("ATEN_CPU_CAPABILITY") == "avx512" and "avx512f" not in flags:
            print(f"{setting}: skipped, this CPU has no AVX-512")
            continue
        for threads in THREADS:
            env = {k: v for k, v in os.environ.items() if k not in CAPS}
            run = subprocess.run([sys.executable, __file__, "--worker", str(threads)], cwd=ROOT, check=True,
                                 env={**env, **variables}, capture_output=True, text=True)
            row = {"setting": setting, "variables": variables, "threads": threads,
                   **json.loads(run.stdout.strip().splitlines()[-1])}
            results.append(row)
            print(f"{setting:44s} {threads} threads ({row['capability']}): "
                  + "  ".join(f"{k} {v:.1e}" for k, v in row["errors"].items()), flush=True)
    name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    isa = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if flag in flags]
    cpu = f"{name} ({', '.join(isa) or 'no AVX2'})"
    out = HERE / "results.json"
    machines = json.loads(out.read_text())["machines"] if out.exists() else {}
    machines[cpu] = results  # one entry per kind of CPU: a rerun elsewhere adds its own
    out.write_text(json.dumps({"machines": machines}, indent=1) + "\n")
    print(f"\n{cpu}\n" + table(results))


def table(results: list[dict]) -> str:
    """Markdown: one row per setting, each comparison's smallest-largest error over the thread counts, and
    the largest of all."""
    names = list(results[0]["errors"])
    lines = ["| setting | ATen ran | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for setting in dict.fromkeys(r["setting"] for r in results):
        rows = [r for r in results if r["setting"] == setting]
        spans = [f"{min(r['errors'][n] for r in rows):.1e}-{max(r['errors'][n] for r in rows):.1e}" for n in names]
        lines.append(f"| {setting} | {rows[0]['capability']} | " + " | ".join(spans) + " |")
    lines.append("| **largest** | | " + " | ".join(f"**{max(r['errors'][n] for r in results):.1e}**" for n in names)
                 + " |")
    return "\n".join(lines)

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=int, metavar="THREADS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args.worker) if args.worker else main()
