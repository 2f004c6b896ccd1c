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

``--regime d512`` (issue #11) instead runs scenarios/dpcr-fmnist-d512.toml, the regime DPCR's calibration is for
(d = 512 > ~300 images per class, a 4-class first task, 8 epochs per task), over ``--seeds`` (default 0 1 2) in
``--jobs`` parallel processes of one thread each: DPCR with the cosine head (ablation rows, LwF head and the
``cip_tol_sweep`` companions on one backbone per seed), the same with the linear head, and the baselines
(lwf-ncm, finetune, joint) for ``--baseline-seeds``. It prints mean and sample standard deviation over the seeds::

    python scripts/bench_dpcr.py --regime d512 --seeds 0 1 2 --jobs 2 --out runs/bench-dpcr-d512
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


# ------------------------------------------------------------------------------------------ the d512 regime
D512 = ROOT / "scenarios/dpcr-fmnist-d512.toml"
D512_ROWS = [("ridge", "ridge only (un-calibrated statistics)"), ("tssp", "+ TSSP"), ("tssp_cip", "+ CIP"),
             ("tssp_cip_cn", "+ CN (= DPCR)"), ("tssp_cn", "TSSP + CN, no CIP"), ("lwf_head", "LwF head")]
D512_BASELINES = ["lwf-ncm", "finetune", "joint"]


def _run_one(job: tuple[str, int, list[str], str, bool]) -> dict:
    """One variant and seed in a worker process on one thread (summary.json reused with ``reuse``)."""
    label, seed, overrides, out, reuse = job
    run_dir = Path(out) / label / f"seed{seed}"
    done = run_dir / "summary.json"
    if reuse and done.exists():
        summary = json.loads(done.read_text())
        if summary.get("status") == "completed":
            return summary
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    variants = dict(load_scenarios(D512, [f"seed={seed}", *overrides]))
    start = time.time()
    with threadpool_limits(1):
        summary = run_scenario(variants[label], run_dir, label=label, show_progress=False)
    print(f"[d512] {label} seed {seed}: last {summary['final_accuracy']:.4f}, {time.time() - start:.0f} s",
          file=sys.stderr, flush=True)
    return summary


def _mean_std(values: list[float]) -> str:
    import numpy as np

    a = np.asarray(values, dtype=float)
    if len(a) < 2:
        return f"{a.mean():.3f}"
    return f"{a.mean():.3f} ± {a.std(ddof=1):.3f}"


def run_d512(args) -> int:  # noqa: ANN001
    import concurrent.futures
    import multiprocessing

    import numpy as np

    seeds, base_seeds = args.seeds, args.baseline_seeds if args.baseline_seeds is not None else args.seeds[:1]
    overrides = (["client.epochs=2", "data.max_test=2000"] if args.quick else []) + args.set
    jobs = [(label, s, overrides, args.out, args.reuse) for s in seeds for label in ("dpcr", "dpcr-linear-head")]
    jobs += [(label, s, overrides, args.out, args.reuse) for s in base_seeds for label in D512_BASELINES]
    start = time.time()
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        summaries = dict(zip([(j[0], j[1]) for j in jobs], pool.map(_run_one, jobs)))
    wall = time.time() - start
    print(f"seeds {seeds}; {len(jobs)} runs in {wall:.0f} s wall ({args.jobs} processes)\n")
    print("| row | cosine head: last acc | avg inc acc | linear head: last acc | avg inc acc |")
    print("|---|---|---|---|---|")
    table = {}
    for key, name in D512_ROWS:
        cells = []
        for label in ("dpcr", "dpcr-linear-head"):
            comp = [summaries[(label, s)]["companions"][key] for s in seeds]
            last = [c["final_accuracy"] for c in comp]
            avg = [c["average_incremental_accuracy"] for c in comp]
            table.setdefault(label, {})[key] = {"final_accuracy": last, "average_incremental_accuracy": avg}
            cells += [_mean_std(last), _mean_std(avg)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nCIP tolerance sweep (cosine head; full method: TSSP + CIP + CN; rank = mean rank of the old classes' "
          "projectors at the last task, of d = 512)\n")
    print("| cip_tol | mean rank | last acc | avg inc acc |")
    print("|---|---|---|---|")
    sweep = summaries[("dpcr", seeds[0])].get("cip_tol_sweep", {})
    rows = [("main learner (strategy.cip_tol; default 0 = S > 0)", "tssp_cip_cn", None)] + [
        (v["cip_tol"] if isinstance(v["cip_tol"], str) else f"{v['cip_tol']:g}", k, k) for k, v in sweep.items()]
    rows.append(("no CIP (P_c = I)", "tssp_cn", None))
    for name, key, sweep_key in rows:
        comp = [summaries[("dpcr", s)]["companions"][key] for s in seeds]
        if sweep_key is not None:
            ranks = [np.mean(list(summaries[("dpcr", s)]["cip_tol_sweep"][sweep_key]["cip_ranks"].values()))
                     for s in seeds]
        elif key == "tssp_cip_cn":
            ranks = [np.mean(list(summaries[("dpcr", s)]["cip_ranks"].values())) for s in seeds]
        else:
            ranks = [512.0]
        print(f"| {name} | {np.mean(ranks):.1f} | {_mean_std([c['final_accuracy'] for c in comp])} | "
              f"{_mean_std([c['average_incremental_accuracy'] for c in comp])} |")
    print(f"\nBaselines (seeds {base_seeds})\n")
    print("| method | last acc | avg inc acc | forgetting | wall s |")
    print("|---|---|---|---|---|")
    for label in D512_BASELINES:
        ss = [summaries[(label, s)] for s in base_seeds]
        print(f"| {label} | {_mean_std([x['final_accuracy'] for x in ss])} | "
              f"{_mean_std([x['average_incremental_accuracy'] for x in ss])} | "
              f"{_mean_std([x['forgetting'] for x in ss])} | {np.mean([x['wall_seconds'] for x in ss]):.0f} |")
    counts = {s: max(summaries[("dpcr", s)]["class_counts"]) for s in seeds}
    print(f"\nlargest class in the training slice per seed: {counts} (d = "
          f"{summaries[('dpcr', seeds[0])]['feature_dim']}); DPCR wall s per run: "
          f"{[round(summaries[('dpcr', s)]['wall_seconds']) for s in seeds]}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(
        {"seeds": seeds, "baseline_seeds": base_seeds, "overrides": overrides, "wall_seconds": wall,
         "ablation": table, "summaries": {f"{k[0]}/seed{k[1]}": v for k, v in summaries.items()}}, indent=1))
    return 0


def diagnose(run_dir: Path) -> int:
    """Why CIP hurts when d > n_c: how much of each class's *test* energy (final backbone) lies outside the row space
    of its stored Gram (the subspace P_c keeps), for the old (calibrated) classes and for the last task's classes
    (stored from this very backbone: no drift, only the n_c < d sampling gap)."""
    import numpy as np
    import torch

    from fedsim.frameworks.class_incremental import embed
    from fedsim.config import config_from_dict
    from fedsim.algorithms.dpcr.learner import row_space_projector
    from fedsim.scenario import test_split

    saved = json.loads((run_dir / "config.json").read_text())
    config = config_from_dict(saved["config"])
    summary = json.loads((run_dir / "summary.json").read_text())
    model = torch.load(run_dir / "model.pt", weights_only=False).eval()
    state = model["dpcr"]
    test = test_split(config)
    z = embed(model.backbone, test.x).double().numpy()
    last_task = set(summary["task_classes"][-1])
    print(f"{run_dir}: d = {z.shape[1]}, cip_tol = {config.strategy.params.cip_tol}")
    print("| class | stored from | n_c | rank of stored Gram | test energy outside its row space | same, train-sized "
          "random subspace |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for c in np.flatnonzero(state["counts"]):
        proj, rank = row_space_projector(state["grams"][c], config.strategy.params.cip_tol)
        zc = z[test.labels == c]
        outside = float(np.sum((zc - zc @ proj) ** 2) / np.sum(zc**2))
        q, _ = np.linalg.qr(rng.standard_normal((z.shape[1], rank)))
        random = float(np.sum((zc - zc @ q @ q.T) ** 2) / np.sum(zc**2))
        where = "this backbone (last task)" if int(c) in last_task else "an earlier backbone, calibrated"
        print(f"| {c} | {where} | {state['counts'][c]} | {rank} | {outside:.3f} | {random:.3f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", choices=["centralized", "federated", "both"], default="both")
    parser.add_argument("--regime", choices=["fmnist-5x2", "d512"], default="fmnist-5x2",
                        help="d512: the regime of scenarios/dpcr-fmnist-d512.toml over seeds (issue #11)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="d512: scenario seeds")
    parser.add_argument("--baseline-seeds", type=int, nargs="*", default=None,
                        help="d512: seeds of the baselines (default: the first of --seeds)")
    parser.add_argument("--jobs", type=int, default=2, help="d512: parallel processes (one thread each)")
    parser.add_argument("--reuse", action="store_true", help="d512: reuse completed runs found under --out")
    parser.add_argument("--quick", action="store_true", help="reduced variant (see QUICK; d512: 2 epochs)")
    parser.add_argument("--backend", choices=["ray", "inline"], help="override simulation.backend")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="scenario override")
    parser.add_argument("--out", default=None, help="default runs/bench-dpcr (d512: runs/bench-dpcr-d512)")
    parser.add_argument("--diagnose", metavar="RUN_DIR", help="CIP diagnosis of one DPCR run directory, then exit")
    args = parser.parse_args(argv)
    if args.diagnose:
        return diagnose(Path(args.diagnose))
    if args.regime == "d512":
        args.out = args.out or "runs/bench-dpcr-d512"
        return run_d512(args)
    args.out = args.out or "runs/bench-dpcr"
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
