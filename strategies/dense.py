"""DENSE (Zhang et al., NeurIPS 2022, arXiv 2112.12371): data-free one-shot FL by ensemble distillation on
synthesized data.

Every client trains the common initial model once and uploads it (the one-shot baselines' client part). The server
holds no data. For ``strategy.epochs`` epochs it

1. synthesizes one batch: a re-initialized generator and fresh latent codes take ``g_steps`` Adam steps on
   ``bn * L_bn + oh * L_ce + adv * L_adv`` (BatchNorm statistics of every local model, cross-entropy of the
   ensemble's mean logits on sampled labels, disagreement of the student with the ensemble on inputs where their
   predictions differ), through a random crop and flip; the lowest-loss iterate joins the pool
   (``fedsim.frameworks.distill.Synthesizer``);
2. distills: one pass over the whole pool (randomly flipped), the ensemble's mean logits into the student at
   temperature T by SGD (``fedsim.frameworks.distill.distill_epoch``; the loop is ``fedsim.frameworks.distill.DataFreeServer``).

Defaults are the official code's (github zj-jayzhang/DENSE, ``loop_df_fl.py`` and its README's KD command); where
fedsim differs (balanced labels by default, images kept in memory instead of a PNG round trip, student initialized
from the scenario's w_0): docs/results-oneshot.md. Parameters and registration: ``fedsim.algorithms.distill.protocol``.
"""

from __future__ import annotations

import torch

from fedsim.frameworks.distill import DataFreeServer, Synthesizer


class DenseServer(DataFreeServer):
    name = "dense"

    def synthesizer(self, ctx, teacher, student) -> Synthesizer:  # noqa: ANN001
        p = self.params
        return Synthesizer(teacher, student, ctx.input_shape, ctx.num_classes, nz=p.nz, ngf=p.ngf,
                           g_steps=p.g_steps, lr_g=p.lr_g, batch_size=p.synthesis_batch_size, bn=p.bn, oh=p.oh,
                           adv=p.adv, labels=p.labels, augment=p.augment, device=ctx.device)

    def optimizer(self, student) -> torch.optim.Optimizer:  # noqa: ANN001
        return torch.optim.SGD(student.parameters(), lr=self.params.lr, momentum=self.params.momentum)

    def kd_options(self) -> dict:
        return {"flip": self.params.augment}
