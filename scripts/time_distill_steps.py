"""Time one server step of FedDF, DENSE and Co-Boosting with fedsim's CNN on 28x28 Fashion-MNIST-shaped inputs, and
what the official server budgets cost at that rate (issue #22).

Builds the teachers and the student as ``scenarios/oneshot-fmnist.toml`` does (5 local models, ``cnn`` width 16,
(1, 28, 28), 10 classes; the weights do not change the cost), takes every other setting from the strategies'
defaults (the official ones: ``fedsim.algorithms.distill.protocol``), and times with the framework's own code:

- FedDF: ``distill_on_data`` steps (Adam on a batch of 128, teacher logits precomputed); budget 10^4 steps;
- DENSE / Co-Boosting: ``Synthesizer.synthesize`` (one synthesized batch of ``g_steps`` generator steps) and
  ``distill_epoch`` over a pool; the official 200 epochs take 200 x 30 generator steps and, as the pool grows by one
  batch per epoch, sum_{e=1..200} e = 20,100 distillation batches.

    python scripts/time_distill_steps.py --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from fedsim.algorithms.distill.protocol import CoBoostingParams, DenseParams, FedDFParams
from fedsim.frameworks.distill import (CoBoostSynthesizer, LogitEnsemble, Synthesizer, distill_epoch,
                                       distill_on_data)
from fedsim.nn.models import build_model

SHAPE, CLASSES, CLIENTS, WIDTH = (1, 28, 28), 10, 5, 16


def nets() -> tuple[LogitEnsemble, torch.nn.Module]:
    models = [build_model("cnn", input_shape=SHAPE, num_classes=CLASSES, width=WIDTH, seed=k).eval()
              for k in range(CLIENTS)]
    for m in models:
        m.requires_grad_(False)
    student = build_model("cnn", input_shape=SHAPE, num_classes=CLASSES, width=WIDTH, seed=99).train()
    return LogitEnsemble(models).eval(), student


def best_of(repeats: int, fn) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many timings per measurement")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}; "
          f"{CLIENTS} teachers + student: cnn width {WIDTH} on {SHAPE}")
    rows = []

    teacher, student = nets()
    p = FedDFParams()
    x = torch.rand(2000, *SHAPE)
    with torch.no_grad():
        logits = teacher(x)
    n = 20
    t = best_of(args.repeats, lambda: distill_on_data(student, x, logits, steps=n, batch_size=p.batch_size, lr=p.lr))
    rows.append(("FedDF", f"distillation step (batch {p.batch_size})", t / n, p.steps, p.steps * t / n))

    for name, params, cls in (("DENSE", DenseParams(), Synthesizer), ("Co-Boosting", CoBoostingParams(),
                                                                      CoBoostSynthesizer)):
        teacher, student = nets()
        extra = {} if cls is Synthesizer else dict(hs=params.hs, adv_temperature=params.adv_temperature,
                                                   mu=params.mu, wdc=params.wdc, wa_steps=params.wa_steps,
                                                   reweight_batch_size=params.batch_size, clip_norm=params.clip_norm)
        g = 3
        synth = cls(teacher, student, SHAPE, CLASSES, nz=params.nz, ngf=params.ngf, g_steps=g, lr_g=params.lr_g,
                    batch_size=params.synthesis_batch_size, bn=params.bn, oh=params.oh, adv=params.adv,
                    augment=cls is Synthesizer, **extra)
        t_gen = best_of(args.repeats, synth.synthesize) / g
        pool = torch.rand(4 * params.batch_size, *SHAPE)
        opt = torch.optim.SGD(student.parameters(), lr=params.lr, momentum=params.momentum)
        kd = {"flip": True} if cls is Synthesizer else {"flip": False, "clip_norm": params.clip_norm,
                                                        "ods_eta": params.ods_eta,
                                                        "ods_temperature": params.ods_temperature}
        t_kd = best_of(args.repeats, lambda: distill_epoch(student, teacher, pool, opt, batch_size=params.batch_size,
                                                           temperature=params.temperature, **kd)) / 4
        gen_steps = params.epochs * params.g_steps
        kd_steps = sum(range(1, params.epochs + 1)) * params.synthesis_batch_size // params.batch_size
        rows.append((name, f"generator step (batch {params.synthesis_batch_size}, ngf {params.ngf}, nz {params.nz})",
                     t_gen, gen_steps, gen_steps * t_gen))
        rows.append((name, f"distillation batch ({params.batch_size})", t_kd, kd_steps, kd_steps * t_kd))
    print("| method | step | s / step | official steps | official budget, one run |")
    print("|---|---|---|---|---|")
    for method, step, t, steps, total in rows:
        print(f"| {method} | {step} | {t:.4f} | {steps:,} | {total / 60:.1f} min |")


if __name__ == "__main__":
    main()
