"""Co-Boosting (Dai et al., ICLR 2024, arXiv 2402.15070): data-free one-shot FL in which the synthesized data and
the ensemble boost each other.

Every client trains the common initial model once and uploads it (the one-shot baselines' client part). The server
holds no data; for ``strategy.epochs`` epochs it

1. synthesizes one batch of hard samples with DENSE's generator machinery (``fedsim.frameworks.distill.CoBoostSynthesizer``):
   the ensemble's cross-entropy on sampled labels weighted by (1 - p)^hs, and the student's disagreement with the
   ensemble at temperature 3, the generator re-initialized per batch and its gradient clipped;
2. re-weights the ensemble: signed-gradient steps on one weight per client that lower the weighted ensemble's
   cross-entropy on the earlier synthetic batches (``fedsim.frameworks.distill.reweight_ensemble``), step mu * wdc^epoch;
3. distills the weighted ensemble into the student over the whole pool, every batch pushed by an
   output-diversified step (ODS) first (``fedsim.frameworks.distill.distill_epoch``), SGD with cosine annealing.

Defaults are the official code's (github rong-dai/Co-Boosting); where fedsim differs: docs/results-oneshot.md.
Parameters and registration: ``fedsim.algorithms.distill.protocol``.
"""

from __future__ import annotations

import torch

from fedsim.frameworks.distill import CoBoostSynthesizer, DataFreeServer


class CoBoostingServer(DataFreeServer):
    name = "co-boosting"

    def synthesizer(self, ctx, teacher, student) -> CoBoostSynthesizer:  # noqa: ANN001
        p = self.params
        return CoBoostSynthesizer(teacher, student, ctx.input_shape, ctx.num_classes, nz=p.nz, ngf=p.ngf,
                                  g_steps=p.g_steps, lr_g=p.lr_g, batch_size=p.synthesis_batch_size, bn=p.bn,
                                  oh=p.oh, adv=p.adv, labels=p.labels, augment=False, clip_norm=p.clip_norm,
                                  device=ctx.device, hs=p.hs, adv_temperature=p.adv_temperature, mu=p.mu,
                                  wdc=p.wdc, wa_steps=p.wa_steps, reweight_batch_size=p.batch_size)

    def optimizer(self, student) -> torch.optim.Optimizer:  # noqa: ANN001
        p = self.params
        return torch.optim.SGD(student.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)

    def scheduler(self, optimizer):  # noqa: ANN001, ANN201
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.params.epochs)

    def kd_options(self) -> dict:
        p = self.params
        return {"flip": False, "clip_norm": p.clip_norm, "ods_eta": p.ods_eta or None,
                "ods_temperature": p.ods_temperature}
