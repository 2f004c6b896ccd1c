"""Prove fedsim's CUDA paths where a GPU exists: clients on `cuda`, fractional GPUs per Ray actor, CPU-equal metrics.

Runs a short FedAvg and a short AFL scenario on real Fashion-MNIST (a 6k/2k slice) three ways: CPU (inline), CUDA
(inline, to read the peak GPU memory of the process) and CUDA through Flower's Ray backend with
`simulation.num_gpus` = 0.25 (four clients share the GPU). Asserts the accuracies equal the CPU run to a stated
tolerance (AFL: float64 ridge statistics, 1e-3 in accuracy and 1e-6 relative in weights; FedAvg: cuDNN kernels
are not bitwise the CPU's, 0.02 in accuracy) and prints round time GPU vs CPU and peak GPU memory. Exits 0 with a
"skipped" line where torch sees no CUDA GPU, so it can run anywhere.

    bash scripts/gpu_check.sh            # or: python scripts/gpu_check.py [--out runs/gpu-check]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BASE = """
seed = 0
[data]
name = "fashion-mnist"
max_train = 6000
max_test = 2000
[partition]
kind = "dirichlet"
num_clients = 8
alpha = 0.5
[model]
name = "cnn"
width = 16
feature_map = "random"
feature_dim = 1024
[client]
epochs = 1
batch_size = 64
lr = 0.02
[simulation]
backend = "inline"
"""


def run(tmp: Path, name: str, strategy: str, *overrides: str) -> dict:
    import torch

    from fedsim.config import load_scenario
    from fedsim.engine.runner import run_scenario

    path = tmp / f"{name}.toml"
    rounds = "rounds = 3\n" if strategy == "fedavg" else ""
    path.write_text(rounds + BASE + f'[strategy]\nname = "{strategy}"\n')
    config = load_scenario(path, list(overrides))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = run_scenario(config, tmp / name, show_progress=False)
    summary["measured_s"] = time.perf_counter() - t0
    summary["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    model = torch.load(tmp / name / "model.pt", weights_only=False)
    if strategy == "afl":
        summary["weights"] = model[-1].weight.detach().double().cpu().numpy()
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check")
    args = parser.parse_args()
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: skipped (torch sees no CUDA GPU on this machine)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name(0)
    results, failures = {}, []
    for strategy in ("fedavg", "afl"):
        cpu = run(out, f"{strategy}-cpu", strategy, "simulation.device=cpu")
        gpu = run(out, f"{strategy}-cuda", strategy, "simulation.device=cuda")
        ray = run(out, f"{strategy}-cuda-ray", strategy, "simulation.device=cuda", "simulation.backend=ray",
                  "simulation.num_gpus=0.25")
        tol = 1e-3 if strategy == "afl" else 0.02
        for label, res in (("cuda inline", gpu), ("cuda ray, 0.25 GPU per client", ray)):
            gap = abs(res["final_accuracy"] - cpu["final_accuracy"])
            if gap > tol:
                failures.append(f"{strategy} {label}: accuracy {res['final_accuracy']:.4f} vs CPU "
                                f"{cpu['final_accuracy']:.4f} (gap {gap:.4f} > {tol})")
            if strategy == "afl":
                rel = float(np.linalg.norm(res["weights"] - cpu["weights"]) / np.linalg.norm(cpu["weights"]))
                if rel > 1e-6:
                    failures.append(f"afl {label}: weights differ from CPU by {rel:.2e} relative (> 1e-6)")
        results[strategy] = {
            "cpu_accuracy": cpu["final_accuracy"], "cuda_accuracy": gpu["final_accuracy"],
            "cuda_ray_accuracy": ray["final_accuracy"], "cpu_s": round(cpu["measured_s"], 2),
            "cuda_s": round(gpu["measured_s"], 2), "cuda_ray_s": round(ray["measured_s"], 2),
            "speedup_inline": round(cpu["measured_s"] / gpu["measured_s"], 2),
            "peak_gpu_mb_inline": round(gpu["peak_gpu_mb"], 1), "tolerance": tol,
        }
    report = {"device": device, "torch": torch.__version__, "results": results, "failures": failures}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
