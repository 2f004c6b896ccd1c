"""Server-side knowledge distillation for one-shot aggregation: the pieces FedDF, DENSE and Co-Boosting share.

- ``LogitEnsemble``: the uploaded local models as one teacher, a weighted mean of their logits (uniform by default;
  Co-Boosting re-fits the weights).
- ``distill_on_data``: distill a fixed set of inputs' teacher logits into a student (FedDF); every distillation
  term here is ``fedsim.nn.losses.kl_distillation`` (Hinton's KL x T^2).
- ``Generator``, ``reset_generator``, ``BatchNormStatistics`` (DeepInversion's feature-statistics hooks),
  ``augment`` (random crop and flip that gradients pass through), ``synthesis_labels``, ``dense_generator_loss``
  and ``Synthesizer`` (one batch per call: the lowest-loss iterate of ``g_steps`` generator steps), and
  ``distill_epoch`` over the synthesized pool (DENSE); ``coboost_generator_loss``, ``reweight_ensemble``,
  ``CoBoostSynthesizer`` and ``perturb_inputs`` (ODS) on the same machinery (Co-Boosting).
- ``OneShotDistillServer``: the server framework: collect the one-shot uploads (``fedsim.frameworks.oneshot_protocol``), run
  a subclass's ``distill`` under a seeded RNG, time it (``server_seconds``), evaluate, save, summarize;
  ``DataFreeServer``: the synthesize-then-distill epoch loop DENSE and Co-Boosting share.

All randomness is drawn from torch's global RNG inside ``seeded`` (forked and seeded from the scenario), so one
seed gives one result on the CPU and the caller's RNG is untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedsim.averaging import weighted_average
from fedsim.nn.seeding import seeded
from fedsim.frameworks import oneshot_protocol
from fedsim.frameworks.oneshot_protocol import LocalModel
from fedsim.nn.losses import kl_distillation
from fedsim.nn.models import num_parameters
from fedsim.nn.training import arrays_to_state, evaluate

__all__ = ["LogitEnsemble", "distill_on_data", "Generator", "reset_generator", "BatchNormStatistics",
           "augment", "synthesis_labels", "dense_generator_loss", "Synthesizer", "coboost_generator_loss",
           "reweight_ensemble", "CoBoostSynthesizer", "perturb_inputs", "distill_epoch", "seeded",
           "OneShotDistillServer", "DataFreeServer", "work_reporter"]


def work_reporter(ctx, name: str) -> Callable[..., Any] | None:  # noqa: ANN001 - a ServerContext
    """``ctx.progress.work`` for the loop ``name`` (steps done / total, loss, time left on the run's progress
    display), or None when the run shows no progress."""
    progress = ctx.progress
    if progress is None:
        return None
    return lambda done, total, **values: progress.work(name, done, total, **values)


# ------------------------------------------------------------------------------------------------ teachers
class LogitEnsemble(nn.Module):
    """``sum_m w_m f_m(x) / sum_m w_m`` over the member models; ``weights`` (M,) default to 1 / M (the mean of the
    logits, DENSE's and FedDF's teacher). Co-Boosting re-fits them (``set_weights``)."""

    def __init__(self, models: Sequence[nn.Module], weights: torch.Tensor | None = None) -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.models = nn.ModuleList(models)
        m = len(models)
        self.register_buffer("weights", torch.full((m,), 1.0 / m) if weights is None else torch.as_tensor(weights))

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, n, C): every member's logits."""
        return torch.stack([model(x) for model in self.models])

    def combine(self, logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """The weighted mean of member logits (M, n, C) -> (n, C); gradients reach ``weights`` when they ask."""
        w = (self.weights if weights is None else weights).to(logits.dtype)
        return (logits * w[:, None, None]).sum(0) / w.sum()

    def set_weights(self, weights: torch.Tensor) -> None:
        self.weights.copy_(torch.as_tensor(weights, dtype=self.weights.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.combine(self.member_logits(x))


def _batches(n: int, batch_size: int) -> list[torch.Tensor]:
    """A fresh random order of ``range(n)`` cut into batches; a trailing batch of 1 joins the previous one."""
    chunks = list(torch.split(torch.randperm(n), batch_size))
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def _distill_step(student: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, teacher_logits: torch.Tensor,
                  temperature: float, clip_norm: float | None) -> torch.Tensor:
    """One optimizer step of the student on ``kl_distillation(student(x), teacher_logits)`` (gradient norm clipped at
    ``clip_norm``); returns the loss. The step FedDF's, DENSE's and Co-Boosting's distillation loops share."""
    loss = kl_distillation(student(x), teacher_logits, temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_norm is not None:
        nn.utils.clip_grad_norm_(student.parameters(), clip_norm)
    optimizer.step()
    return loss


def distill_on_data(student: nn.Module, x: torch.Tensor, teacher_logits: torch.Tensor, *, steps: int,
                    batch_size: int, lr: float, temperature: float = 1.0, schedule: str = "cosine",
                    clip_norm: float | None = 5.0, device: str | torch.device = "cpu",
                    log_every: int = 100, report: Callable[..., Any] | None = None) -> list[dict[str, float]]:
    """FedDF's server loop: ``steps`` Adam steps on ``kl_distillation(student(x_b), teacher_logits_b)``, in place.

    Batches are drawn pass after pass over a fresh random order of ``x`` (the global RNG; wrap in ``seeded``). The
    teacher's logits are given (computed once: the inputs are not augmented, so they do not change). The student
    trains in train mode (its BatchNorm layers see the distillation data). Returns rows {step, loss, lr} every
    ``log_every`` steps and at the last (the mean loss since the previous row). ``report(step, steps, loss=...)``
    is called after every step (``work_reporter``: the run's progress display).
    """
    device = torch.device(device)
    student.to(device).train()
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("no distillation data")
    rows, order, total, count = [], [], 0.0, 0
    for step in range(1, steps + 1):
        if not order:
            order = _batches(n, batch_size)[::-1]
        idx = order.pop()
        xb, tb = x[idx].to(device), teacher_logits[idx].to(device)
        loss = _distill_step(student, opt, xb, tb, temperature, clip_norm)
        lr_now = opt.param_groups[0]["lr"]
        if sched is not None:
            sched.step()
        value = float(loss.detach())
        total, count = total + value, count + 1
        if report is not None:
            report(step, steps, loss=value, lr=lr_now)
        if step % log_every == 0 or step == steps:
            rows.append({"step": step, "loss": total / count, "lr": lr_now})
            total, count = 0.0, 0
    student.eval()
    return rows


# ------------------------------------------------------------------------------------------- synthesis
class Generator(nn.Module):
    """DENSE's generator (the official ``models/generator.py`` architecture, written anew): a linear map of z to a
    (2 ngf, H/4, W/4) map, BatchNorm, two (upsample x2, 3x3 conv, BatchNorm, LeakyReLU 0.2) stages, a 3x3 conv to
    ``channels``, sigmoid: images in [0, 1] like the datasets'. Sizes that 4 does not divide are cropped."""

    def __init__(self, nz: int, ngf: int, image_shape: Sequence[int]) -> None:
        super().__init__()
        c, h, w = (int(s) for s in image_shape)
        self.nz, self.image_shape = int(nz), (c, h, w)
        self.init_size = (-(-h // 4), -(-w // 4))
        self.l1 = nn.Linear(nz, ngf * 2 * self.init_size[0] * self.init_size[1])
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(ngf * 2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ngf, c, 3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.l1(z).view(z.shape[0], -1, *self.init_size)
        img = self.conv_blocks(out)
        _, h, w = self.image_shape
        return img[:, :, :h, :w]


def reset_generator(generator: nn.Module) -> None:
    """DENSE's re-initialization before every synthesized batch: conv / linear weights N(0, 0.02), biases 0,
    BatchNorm weights N(1, 0.02), biases 0 (running statistics as they were)."""
    for m in generator.modules():
        if isinstance(m, (nn.ConvTranspose2d, nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.constant_(m.bias, 0)


def feature_statistics_loss(inputs: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor) -> torch.Tensor:
    """DeepInversion's term for one BatchNorm layer: ``||mu_run - mu(x)||_2 + ||var_run - var(x)||_2`` over the
    layer's input ``x`` (per channel, biased variance over the batch and spatial positions)."""
    nch = inputs.shape[1]
    flat = inputs.transpose(0, 1).reshape(nch, -1)
    mean = flat.mean(1)
    var = flat.var(1, unbiased=False)
    return torch.norm(running_var - var, 2) + torch.norm(running_mean - mean, 2)


class BatchNormStatistics:
    """Forward hooks on every BatchNorm layer of ``modules``: after a forward pass, ``loss()`` is the sum over the
    layers of ``feature_statistics_loss`` (their inputs against their running statistics). ``remove()`` detaches."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.layers = [m for module in modules for m in module.modules()
                       if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.values: dict[int, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.layers)]

    def _hook(self, i: int):  # noqa: ANN202
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.values[i] = feature_statistics_loss(inputs[0], module.running_mean, module.running_var)
        return hook

    def loss(self) -> torch.Tensor:
        if not self.values:
            return torch.zeros(())
        return sum(self.values.values())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> BatchNormStatistics:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def augment(x: torch.Tensor, padding: int, flip: bool = True) -> torch.Tensor:
    """Per image: a random (H, W) crop of the zero-padded image and a horizontal flip with probability 1/2
    (kornia's RandomCrop(padding) + RandomHorizontalFlip, as DENSE applies them); gradients flow to ``x``."""
    n, _, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,))
        dx = torch.randint(0, 2 * padding + 1, (n,))
        rows = (dy[:, None] + torch.arange(h)[None, :]).to(x.device)  # (n, h)
        cols = (dx[:, None] + torch.arange(w)[None, :]).to(x.device)  # (n, w)
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mirror = (torch.rand(n) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def crop_padding(image_shape: Sequence[int]) -> int:
    """DENSE's crop padding, 4 for 28x28 and 32x32 images, scaled as round(min(H, W) / 8) for other sizes."""
    return max(1, int(round(min(int(image_shape[1]), int(image_shape[2])) / 8)))


def synthesis_labels(n: int, num_classes: int, mode: str = "balanced") -> torch.Tensor:
    """Labels of a synthesized batch: "balanced" cycles through the classes (counts differ by at most one),
    "random" draws them uniformly (DENSE's official ``randint``); sorted either way, as the official code sorts."""
    if mode == "balanced":
        return torch.arange(n) % num_classes if n >= num_classes else torch.randperm(num_classes)[:n].sort()[0]
    if mode == "random":
        return torch.randint(0, num_classes, (n,)).sort()[0]
    raise ValueError(f"unknown label mode {mode!r}")


def dense_generator_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                         bn_loss: torch.Tensor, *, bn: float, oh: float, adv: float) -> dict[str, torch.Tensor]:
    """DENSE's generator objective ``bn * L_bn + oh * L_ce + adv * L_adv`` and its terms.

    ``L_ce = CE(teacher_logits, targets)``; ``L_adv = -mean_i( KL(softmax(t_i) || softmax(s_i)) * [argmax s_i !=
    argmax t_i] )``: the generator seeks inputs where the student still disagrees with the ensemble (the official
    ``loss_adv``; gradients reach the generator through both the ensemble's and the student's outputs).
    """
    loss_oh = F.cross_entropy(teacher_logits, targets)
    mask = (student_logits.argmax(1) != teacher_logits.argmax(1)).to(teacher_logits.dtype)
    per_sample = kl_distillation(student_logits, teacher_logits, 1.0, reduction="none").sum(1)
    loss_adv = -(per_sample * mask).mean()
    total = bn * bn_loss + oh * loss_oh + adv * loss_adv
    return {"loss": total, "bn": bn_loss, "oh": loss_oh, "adv": loss_adv}


class Synthesizer:
    """DENSE's synthesis: every ``synthesize()`` re-initializes the generator and fresh latent codes, takes
    ``g_steps`` Adam steps (betas 0.5, 0.999) on both, and adds the lowest-loss iterate's images (with their sampled
    labels) to the pool. The ensemble is in eval mode (its BatchNorm statistics are the targets); the student keeps
    its mode (DENSE's official code leaves it in train mode). ``clip_norm`` clips the generator's gradient norm
    (Co-Boosting: 10; DENSE: none). Subclasses change the objective (``generator_loss``) and what follows a batch
    (``after_synthesis``)."""

    def __init__(self, teacher: LogitEnsemble, student: nn.Module, image_shape: Sequence[int], num_classes: int, *,
                 nz: int, ngf: int, g_steps: int, lr_g: float, batch_size: int, bn: float, oh: float, adv: float,
                 labels: str = "balanced", augment: bool = True, clip_norm: float | None = None,
                 device: str | torch.device = "cpu") -> None:
        self.teacher, self.student = teacher, student
        self.device = torch.device(device)
        self.generator = Generator(nz, ngf, image_shape).to(self.device)
        self.image_shape, self.num_classes = tuple(int(s) for s in image_shape), int(num_classes)
        self.nz, self.g_steps, self.lr_g, self.batch_size = int(nz), int(g_steps), float(lr_g), int(batch_size)
        self.weights = {"bn": float(bn), "oh": float(oh), "adv": float(adv)}
        self.labels, self.augment, self.clip_norm = labels, bool(augment), clip_norm
        self.padding = crop_padding(self.image_shape)
        self.pool_x: list[torch.Tensor] = []
        self.pool_y: list[torch.Tensor] = []
        self.batches = 0

    def generator_loss(self, images: torch.Tensor, targets: torch.Tensor,
                       hooks: BatchNormStatistics | None) -> dict[str, torch.Tensor]:
        """DENSE's objective for one iterate (``dense_generator_loss`` on the augmented view)."""
        view = augment(images, self.padding) if self.augment else images
        t_out = self.teacher(view)
        s_out = self.student(view)
        bn_loss = hooks.loss() if hooks is not None else torch.zeros((), device=images.device)
        return dense_generator_loss(t_out, s_out, targets, bn_loss, **self.weights)

    def synthesize(self) -> dict[str, float]:
        """One batch into the pool; returns the chosen iterate's loss terms."""
        self.teacher.eval()
        self.generator.train()
        reset_generator(self.generator)
        z = torch.randn(self.batch_size, self.nz, device=self.device).requires_grad_(True)
        targets = synthesis_labels(self.batch_size, self.num_classes, self.labels).to(self.device)
        opt = torch.optim.Adam([{"params": self.generator.parameters()}, {"params": [z]}], self.lr_g,
                               betas=(0.5, 0.999))
        best, best_terms, best_images = math.inf, {}, None
        hooks = BatchNormStatistics([self.teacher]) if self.weights["bn"] > 0 else None
        try:
            for _ in range(self.g_steps):
                opt.zero_grad(set_to_none=True)
                images = self.generator(z)
                terms = self.generator_loss(images, targets, hooks)
                value = float(terms["loss"].detach())
                if value < best or best_images is None:
                    best, best_images = value, images.detach().clone()
                    best_terms = {k: float(v.detach()) for k, v in terms.items()}
                terms["loss"].backward()
                if self.clip_norm is not None:
                    nn.utils.clip_grad_norm_(self.generator.parameters(), self.clip_norm)
                opt.step()
        finally:
            if hooks is not None:
                hooks.remove()
        self.pool_x.append(best_images.cpu())
        self.pool_y.append(targets.cpu())
        self.after_synthesis(best_images, targets)
        self.batches += 1
        return best_terms

    def after_synthesis(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Hook after a batch joined the pool (Co-Boosting re-fits the ensemble weights here)."""

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every synthesized image so far and its sampled label."""
        return torch.cat(self.pool_x), torch.cat(self.pool_y)


def coboost_generator_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                           bn_loss: torch.Tensor, *, bn: float, oh: float, adv: float, hs: float = 1.0,
                           adv_temperature: float = 3.0) -> dict[str, torch.Tensor]:
    """Co-Boosting's generator objective ``bn * L_bn + oh * L_hard + adv * L_adv`` and its terms.

    ``L_hard = mean_i (1 - p_i)^hs CE_i`` with ``p_i`` the ensemble's (detached) probability of the sampled label:
    the focal weight favours samples the ensemble finds hard. ``L_adv = -mean_i KL_T(t_i || s_i)`` at temperature
    ``adv_temperature`` (times T^2), on every sample (no agreement mask, unlike DENSE).
    """
    ce = F.cross_entropy(teacher_logits, targets, reduction="none")
    p = F.softmax(teacher_logits, dim=1).gather(1, targets[:, None]).squeeze(1).detach()
    loss_oh = ((1.0 - p).pow(hs) * ce).mean()
    loss_adv = -kl_distillation(student_logits, teacher_logits, adv_temperature, reduction="none").sum(1).mean()
    total = bn * bn_loss + oh * loss_oh + adv * loss_adv
    return {"loss": total, "bn": bn_loss, "oh": loss_oh, "adv": loss_adv}


def reweight_ensemble(member_logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, step: float,
                      passes: int = 1, batch_size: int = 128) -> torch.Tensor:
    """Co-Boosting's ensemble re-weighting: signed-gradient steps on the per-client weights that lower the weighted
    ensemble's cross-entropy on the synthetic samples (``member_logits`` (M, n, C), their sampled ``labels``),
    batch by batch in a random order, ``w <- clip(w - step * sign(grad), [w_0 - 1, w_0 + 1] and [0, 1])`` with
    ``w_0`` the weights at the call. Returns the new weights (M,)."""
    origin = weights.detach().clone()
    w = origin.clone()
    n = int(labels.shape[0])
    for _ in range(passes):
        for idx in _batches(n, batch_size):
            w = w.detach().requires_grad_(True)
            logits = (member_logits[:, idx] * w[:, None, None]).sum(0) / w.sum()
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, labels[idx]), w)
            w = w.detach() - step * grad.sign()
            w = (origin + (w - origin).clamp(-1.0, 1.0)).clamp(0.0, 1.0)
    return w.detach()


class CoBoostSynthesizer(Synthesizer):
    """Co-Boosting's synthesis on DENSE's machinery: the hard-sample objective (``coboost_generator_loss``) on the
    generator's images as they are (no augmentation), the student in eval mode while the generator trains, the
    generator's gradient norm clipped; after every batch but the first the ensemble's per-client weights are re-fitted
    on the whole pool (``reweight_ensemble``, step ``mu * wdc^epoch``)."""

    def __init__(self, *args: Any, hs: float, adv_temperature: float, mu: float, wdc: float, wa_steps: int,
                 reweight_batch_size: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hs, self.adv_temperature = float(hs), float(adv_temperature)
        self.mu, self.wdc, self.wa_steps, self.reweight_batch_size = float(mu), float(wdc), int(wa_steps), \
            int(reweight_batch_size)
        self.member_logits: list[torch.Tensor] = []  # (M, b, C) per pooled batch: the members are fixed

    def generator_loss(self, images: torch.Tensor, targets: torch.Tensor,
                       hooks: BatchNormStatistics | None) -> dict[str, torch.Tensor]:
        t_out = self.teacher(images)
        s_out = self.student(images)
        m = len(self.teacher.models)
        bn_loss = hooks.loss() / m if hooks is not None else torch.zeros((), device=images.device)
        return coboost_generator_loss(t_out, s_out, targets, bn_loss, hs=self.hs,
                                      adv_temperature=self.adv_temperature, **self.weights)

    def synthesize(self) -> dict[str, float]:
        mode = self.student.training
        self.student.eval()
        try:
            return super().synthesize()
        finally:
            self.student.train(mode)

    def after_synthesis(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """Re-fit the weights on the batches synthesized before this one (as the official code, which re-weights
        before it adds the new batch, from the second epoch on), then remember the new batch's member logits."""
        if self.batches > 0:
            logits = torch.cat(self.member_logits, dim=1)
            labels = torch.cat(self.pool_y[:-1])
            step = self.mu * self.wdc ** self.batches
            w = reweight_ensemble(logits, labels, self.teacher.weights.detach().cpu(), step=step,
                                  passes=self.wa_steps, batch_size=self.reweight_batch_size)
            self.teacher.set_weights(w)
        with torch.no_grad():
            self.member_logits.append(self.teacher.member_logits(images).detach().cpu())


def perturb_inputs(teacher: nn.Module, x: torch.Tensor, eta: float, temperature: float = 4.0) -> torch.Tensor:
    """Co-Boosting's output-diversified step (ODS, Tashiro et al. 2020) on distillation inputs:
    ``x + eta * sign(grad_x sum(w * softmax(teacher(x) / T)))`` with ``w ~ U(-1, 1)`` per output."""
    x = x.detach().requires_grad_(True)
    out = teacher(x)
    w = torch.empty_like(out).uniform_(-1.0, 1.0)
    (grad,) = torch.autograd.grad((w * F.softmax(out / temperature, dim=1)).sum(), x)
    return (x + eta * grad.sign()).detach()


def distill_epoch(student: nn.Module, teacher: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                  batch_size: int, temperature: float, flip: bool = True, clip_norm: float | None = None,
                  ods_eta: float | None = None, ods_temperature: float = 4.0,
                  device: str | torch.device = "cpu") -> float:
    """One pass over ``x`` in a random order: the ensemble's logits on each batch distilled into the student
    (``kl_distillation`` at ``temperature``), one optimizer step per batch; returns the mean loss. DENSE flips the batch at
    random (``flip``); Co-Boosting perturbs it (``ods_eta``, ``perturb_inputs``) and clips the gradient norm."""
    device = torch.device(device)
    student.train()
    teacher.eval()
    total, count = 0.0, 0
    for idx in _batches(int(x.shape[0]), batch_size):
        xb = x[idx].to(device)
        if flip:
            xb = augment(xb, 0, flip=True)
        if ods_eta is not None:
            xb = perturb_inputs(teacher, xb, ods_eta, ods_temperature)
        with torch.no_grad():
            t_out = teacher(xb)
        loss = _distill_step(student, optimizer, xb, t_out, temperature, clip_norm)
        total, count = total + float(loss.detach()) * idx.numel(), count + idx.numel()
    return total / max(count, 1)


# ------------------------------------------------------------------------------------------ server framework
class OneShotDistillServer:
    """Collects the one-shot uploads (``fedsim.frameworks.oneshot_protocol``, the one-shot baselines' client part), builds the
    local models, and hands them to ``distill(ctx, local, models) -> (student, extra summary)``, run under a seeded
    RNG and timed: ``server_seconds`` is the wall time of that server-side work (building the ensemble, its logits,
    synthesis, distillation), not of the test evaluations. The student is the saved model.pt."""

    name = "distill"

    def __init__(self, params) -> None:  # noqa: ANN001 - the strategy's params (fedsim.algorithms.distill.protocol)
        self.params = params

    def collect(self, ctx) -> list[LocalModel]:  # noqa: ANN001
        return oneshot_protocol.collect_local_models(ctx, "distill")

    def local_model(self, ctx, arrays: dict) -> nn.Module:  # noqa: ANN001
        return arrays_to_state(ctx.initial_model(), arrays).to(ctx.device).eval()

    def average(self, ctx, local: list[LocalModel], weighting: str = "uniform") -> nn.Module:  # noqa: ANN001
        weights = [e.n for e in local] if weighting == "examples" else None
        return self.local_model(ctx, weighted_average([e.arrays for e in local], weights))

    def evaluate(self, ctx, model: nn.Module) -> dict:  # noqa: ANN001
        test = ctx.test_data()
        return evaluate(model, test.x, test.y, batch_size=ctx.config.evaluation.batch_size, device=ctx.device)

    def distill(self, ctx, local: list[LocalModel], models: list[nn.Module]):  # noqa: ANN001, ANN201
        raise NotImplementedError

    def run(self, ctx) -> None:  # noqa: ANN001
        ctx.set_total_steps(1)
        local = self.collect(ctx)
        start = time.perf_counter()
        with seeded(ctx.derive_seed(self.name, "server"), ctx.device):
            models = [self.local_model(ctx, e.arrays) for e in local]
            student, extra = self.distill(ctx, local, models)
        server_seconds = time.perf_counter() - start
        student = student.eval()
        res = self.evaluate(ctx, student)
        teacher = self.evaluate(ctx, LogitEnsemble(models).eval())
        n = np.array([e.n for e in local], dtype=np.float64)
        loss = float(np.dot(n, [e.loss for e in local]) / n.sum())
        ctx.log(1, accuracy=res["accuracy"], loss=res["loss"], train_loss=loss, local_models=len(local),
                **ctx.client_accuracy(res["class_accuracy"], model=student))
        ctx.save_model(student.cpu())
        ctx.summary(final_accuracy=float(res["accuracy"]), num_parameters=num_parameters(student),
                    single_model_parameters=num_parameters(models[0]), local_models=len(local),
                    server_seconds=round(server_seconds, 3), ensemble_accuracy=float(teacher["accuracy"]), **extra)


class DataFreeServer(OneShotDistillServer):
    """The data-free loop DENSE and Co-Boosting share: per epoch one synthesized batch (``synthesizer``), then one
    distillation pass over the whole pool (``distill_epoch`` with ``kd_options``), then ``end_epoch``. Subclasses
    build the synthesizer, the student's optimizer and scheduler, and say how a pass distills."""

    def synthesizer(self, ctx, teacher: LogitEnsemble, student: nn.Module) -> Synthesizer:  # noqa: ANN001
        raise NotImplementedError

    def optimizer(self, student: nn.Module) -> torch.optim.Optimizer:
        raise NotImplementedError

    def scheduler(self, optimizer: torch.optim.Optimizer):  # noqa: ANN201
        return None

    def kd_options(self) -> dict[str, Any]:
        return {}

    def distill(self, ctx, local: list[LocalModel], models: list[nn.Module]):  # noqa: ANN001, ANN201
        import pandas as pd

        p = self.params
        shape = ctx.input_shape
        if len(shape) != 3 or min(shape[1], shape[2]) < 4:
            from fedsim.errors import ConfigError

            raise ConfigError(f"strategy.name: {ctx.config.strategy.name} synthesizes images and needs (C, H, W) "
                              f"inputs of at least 4x4; this scenario's are {tuple(shape)}")
        for m in models:
            m.requires_grad_(False)  # gradients pass through the teachers to the images, never into them
        teacher = LogitEnsemble(models).to(ctx.device).eval()
        student = self.average(ctx, local) if p.student_init == "average" else ctx.initial_model()
        student = student.to(ctx.device).train()
        synth = self.synthesizer(ctx, teacher, student)
        opt = self.optimizer(student)
        sched = self.scheduler(opt)
        rows = []
        report = work_reporter(ctx, f"synthesis + distillation epoch (x{synth.g_steps} generator steps)")
        g = synth.g_steps  # epoch e costs about g generator steps + a pass over the e batches of the pool
        cost = lambda e: e * g + e * (e + 1) / 2  # noqa: E731
        for epoch in range(1, p.epochs + 1):
            student.requires_grad_(False)  # the generator's steps need no gradient of the student's weights
            terms = synth.synthesize()
            student.requires_grad_(True)
            x, _ = synth.pool()
            lr = opt.param_groups[0]["lr"]
            kd = distill_epoch(student, teacher, x, opt, batch_size=p.batch_size, temperature=p.temperature,
                               device=ctx.device, **self.kd_options())
            if sched is not None:
                sched.step()
            row = {"epoch": epoch, "pool": int(x.shape[0]), "kd_loss": kd, "lr": lr,
                   **{f"g_{k}": v for k, v in terms.items()}}
            weights = teacher.weights.detach().cpu().numpy()
            if not np.allclose(weights, weights[0]):
                row.update({f"w_{e.pid}": float(w) for e, w in zip(local, weights)})
            rows.append(row)
            if report is not None:
                report(epoch, p.epochs, loss=kd, g_loss=terms.get("loss", math.nan), pool=int(x.shape[0]),
                       fraction=cost(epoch) / cost(p.epochs))
        ctx.save_table("distill.csv", pd.DataFrame(rows).fillna(1.0 / len(models)), index=False)
        extra = {"synthesized_images": int(x.shape[0]), "distill_loss": float(rows[-1]["kd_loss"])}
        return student, extra
