"""Which directions DPCR's CIP keeps on a run's stored class Grams, by operator (issue #22).

For each class of a finished DPCR run (``<run dir>/model.pt``: the stored Phi_c = X_c^T X_c, float64), prints the
number of exactly dead channels (Phi_jj = 0: the feature is 0 for every image of the class), the rank fedsim's
default keeps (``cip_tol = 0``, S > 0), what the official code's ``torch.svd`` keeps with ``S > 0`` on the same Gram
in float32 (its dtype) and in float64, and the numerical rank (``cip_tol = "rank"``). The last task's classes are
stored from the final backbone (uncalibrated: the Grams the next calibration would project with); the others were
calibrated (Phi_c <- W_c^T Phi_c W_c).

    python scripts/dpcr_cip_ranks.py runs/x/dpcr/seed-0 [more run dirs]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fedsim.algorithms.dpcr.learner import row_space_projector


def main(dirs: list[str]) -> None:
    print("| run | class | stored from | n_c | dead channels | fedsim S > 0 | official torch.svd f32 S > 0 | "
          "torch.svd f64 S > 0 | numerical rank |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in map(Path, dirs):
        state = torch.load(run / "model.pt", weights_only=False)["dpcr"]
        last = set(json.loads((run / "summary.json").read_text())["task_classes"][-1])
        for c in np.flatnonzero(state["counts"]):
            g = np.asarray(state["grams"][c], dtype=np.float64)
            dead = int((np.diagonal(g) == 0).sum())
            ours = row_space_projector(g, 0.0)[1]
            f32 = int((torch.svd(torch.tensor(g, dtype=torch.float32))[1] > 0).sum())
            f64 = int((torch.svd(torch.tensor(g))[1] > 0).sum())
            rank = row_space_projector(g, "rank")[1]
            where = "last task (uncalibrated)" if int(c) in last else "earlier, calibrated"
            print(f"| {run} | {c} | {where} | {state['counts'][c]} | {dead} | {ours} | {f32} | {f64} | {rank} |")


if __name__ == "__main__":
    main(sys.argv[1:])
