"""FedDF (Lin et al., NeurIPS 2020, arXiv 2006.07242), one-shot: the server distills the local models' ensemble.

Every client trains the common initial model once and uploads it (the one-shot baselines' client part). The server
then:

1. takes unlabeled distillation inputs: the training images the server holds and no client does
   (``data.server_holdout``, ``fedsim.scenario.server_holdout``; FedDF's default 0.1 of the training split) or
   another dataset (``strategy.distill_data = "dataset"``, ``strategy.dataset``);
2. computes the ensemble's averaged logits on them once (``avg_logits``, uniform over the M local models);
3. starts the student from the uniform average of the local models (FedAvg's model) and takes ``strategy.steps``
   Adam steps on KL(softmax(t / T) || softmax(s / T)) T^2, cosine-annealed, gradient norm clipped
   (``fedsim.frameworks.distill.distill_on_data``).

The official code also stops early on a labeled validation split (10% of the training data, patience 1000 batches)
and returns the best model on it; fedsim's server has no labels, so it runs the full budget (docs/results-oneshot.md).
Parameters and registration: ``fedsim.algorithms.distill.protocol``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fedsim.frameworks.distill import LogitEnsemble, OneShotDistillServer, distill_on_data, work_reporter
from fedsim.errors import ConfigError
from fedsim.scenario import derive_seed, server_holdout, train_split
from fedsim.nn.training import predict_logits


def distillation_inputs(config) -> torch.Tensor:  # noqa: ANN001
    """The unlabeled images FedDF distills on (float (n, C, H, W)); labels are never read."""
    p = config.strategy.params
    shape = tuple(train_split(config).input_shape)
    if p.distill_data == "holdout":
        held = server_holdout(config)
        if held.size == 0:
            raise ConfigError("data.server_holdout: no training image is held out for FedDF's distillation; set a "
                              "fraction in (0, 1) or strategy.distill_data = 'dataset'")
        return train_split(config).x[torch.as_tensor(held)]
    from fedsim.data import load_dataset

    data = load_dataset(p.dataset, split=p.dataset_split, root=config.data.root)
    x = data.x
    if tuple(data.input_shape) != shape:
        if not p.dataset_resize:
            raise ConfigError(f"strategy.dataset: {p.dataset!r} has images of shape {tuple(data.input_shape)}, the "
                              f"scenario's model takes {shape}; choose a dataset of that shape or set "
                              f"strategy.dataset_resize = true")
        from fedsim.data.resize import resize_images

        try:
            x = resize_images(x, shape)
        except ValueError as exc:
            raise ConfigError(f"strategy.dataset_resize: {p.dataset!r} {exc}") from None
    if p.dataset_size is not None and p.dataset_size < len(data):
        keep = np.sort(np.random.default_rng(derive_seed(config.seed, "feddf-dataset")).permutation(len(data))
                       [:p.dataset_size])
        x = x[torch.as_tensor(keep)]
    return x


class FedDFServer(OneShotDistillServer):
    name = "feddf"

    def distill(self, ctx, local, models):  # noqa: ANN001, ANN201
        p = self.params
        x = distillation_inputs(ctx.config)
        teacher = LogitEnsemble(models).eval()
        t_logits = predict_logits(teacher, x, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)
        student = self.average(ctx, local, p.init_weighting) if p.init == "average" else ctx.initial_model()
        rows = distill_on_data(student, x, t_logits, steps=p.steps, batch_size=p.batch_size, lr=p.lr,
                               temperature=p.temperature, schedule=p.schedule, clip_norm=p.clip_norm,
                               device=ctx.device, report=work_reporter(ctx, "distillation step"))
        ctx.save_table("distill.csv", pd.DataFrame(rows), index=False)
        return student, {"distill_examples": int(x.shape[0]), "distill_steps": int(p.steps),
                         "distill_loss": float(rows[-1]["loss"])}
