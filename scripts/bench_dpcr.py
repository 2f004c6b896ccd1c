"""Benchmark for DPCR (fedsim issue #6): ablation and baselines on Fashion-MNIST 5 x 2, centralized and federated.

Runs the variants of scenarios/dpcr-fmnist.toml (centralized) and scenarios/dpcr-fmnist-federated.toml (10 clients,
Dirichlet 0.5) and prints one markdown table: last accuracy, average incremental accuracy, forgetting, backward
transfer, wall time, memory of what each method stores between tasks, and bytes moved.

The DPCR run has ``strategy.ablation = true``: its ablation rows (ridge on un-calibrated statistics, +TSSP, +CIP,
+CN) and the LwF head are evaluated on the same backbone and the same statistics (wall time = that one run). The
separate ``lwf`` run trains the identical backbone (same message rounds and seeds) and must reproduce the LwF-head
row exactly; the script checks it.

    python scripts/bench_dpcr.py                          # both settings, the scenario files as they are
    python scripts/bench_dpcr.py --quick                  # reduced: 5,000 train / 2,000 test images, 2 passes/task
    python scripts/bench_dpcr.py --setting federated --set data.max_train=10000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedsim.config import load_scenarios  # noqa: E402
from fedsim.engine.runner import run_scenario  # noqa: E402

SCENARIOS = {"centralized": ROOT / "scenarios/dpcr-fmnist.toml",
             "federated": ROOT / "scenarios/dpcr-fmnist-federated.toml"}
ABLATION_ROWS = [("ridge", "ridge only (un-calibrated statistics)"), ("tssp", "+ TSSP"), ("tssp_cip", "+ CIP"),
                 ("tssp_cip_cn", "+ CN (= DPCR)")]
BASELINES = ["lwf", "lwf-ncm", "finetune", "joint"]
QUICK = {"centralized": ["data.max_train=5000", "data.max_test=2000", "client.epochs=2"],
         "federated": ["data.max_train=5000", "data.max_test=2000", "strategy.local_rounds=2"]}


def fmt(v, digits: int = 3) -> str:  # noqa: ANN001
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def run_setting(setting: str, overrides: list[str], out: Path, backend: str | None) -> list[dict]:
    extra = list(overrides)
    if backend:
        extra.append(f"simulation.backend=\"{backend}\"")
    variants = dict(load_scenarios(SCENARIOS[setting], extra))
    rows, summaries = [], {}
    for label in ["dpcr", *BASELINES]:
        config = variants[label]
        start = time.time()
        summary = run_scenario(config, out / setting / label, label=label, show_progress=False)
        summaries[label] = summary
        print(f"[{setting}] {label}: last {summary['final_accuracy']:.3f}, {time.time() - start:.0f} s",
              file=sys.stderr, flush=True)
    dpcr = summaries["dpcr"]
    n_train = variants["dpcr"].data.max_train or 60000
    stats = dpcr["statistics_bytes"]
    d = dpcr["feature_dim"]
    for key, name in ABLATION_ROWS:
        c = dpcr["companions"][key]
        rows.append(dict(setting=setting, method=name, **c, wall=dpcr["wall_seconds"], stored=stats,
                         up=dpcr["bytes_up"], down=dpcr["bytes_down"], note="one DPCR run"))
    head = dpcr["companions"]["lwf_head"]
    lwf = summaries["lwf"]
    same = (lwf["final_accuracy"] == head["final_accuracy"]
            and lwf["average_incremental_accuracy"] == head["average_incremental_accuracy"])
    print(f"[{setting}] lwf run reproduces DPCR's LwF head exactly: {same}", file=sys.stderr)
    stored = {"lwf": 0, "lwf-ncm": 10 * d * 8, "finetune": 0, "joint": n_train * 28 * 28}
    for label in BASELINES:
        s = summaries[label]
        rows.append(dict(setting=setting, method=label, final_accuracy=s["final_accuracy"],
                         average_incremental_accuracy=s["average_incremental_accuracy"], forgetting=s["forgetting"],
                         backward_transfer=s["backward_transfer"], wall=s["wall_seconds"], stored=stored[label],
                         up=s["bytes_up"], down=s["bytes_down"],
                         note={"lwf": "LwF head", "lwf-ncm": "prototypes", "joint": "keeps all images (uint8)"}
                         .get(label, "")))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["centralized", "federated", "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="reduced variant (see QUICK)")
    parser.add_argument("--backend", choices=["ray", "inline"], help="override simulation.backend")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="scenario override")
    parser.add_argument("--out", default="runs/bench-dpcr")
    args = parser.parse_args(argv)
    settings = ["centralized", "federated"] if args.setting == "both" else [args.setting]
    rows = []
    for setting in settings:
        overrides = (QUICK[setting] if args.quick else []) + args.set
        rows += run_setting(setting, overrides, Path(args.out), args.backend)
    print("| setting | method | last acc | avg inc acc | forgetting | BWT | wall s | stored between tasks | "
          "bytes up | bytes down |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        stored = human(r["stored"]) + (f" ({r['note']})" if r["note"] else "")
        print(f"| {r['setting']} | {r['method']} | {fmt(r['final_accuracy'])} | "
              f"{fmt(r['average_incremental_accuracy'])} | {fmt(r['forgetting'])} | {fmt(r['backward_transfer'])} | "
              f"{r['wall']:.0f} | {stored} | {human(r['up'])} | {human(r['down'])} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
