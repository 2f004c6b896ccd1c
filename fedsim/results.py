"""Run directories: what a run leaves behind, written so that an interrupted run keeps everything so far.

Every file is replaced atomically (write to a temporary file, then rename), and metrics.csv is rewritten after
each round, so a killed run leaves complete files describing the rounds it finished.

    run_dir/config.json     resolved scenario, package versions, seed
    run_dir/partition.csv   clients x classes sample counts (+ size)
    run_dir/metrics.csv     one row per round / stream step
    run_dir/summary.json    strategy, dataset, num_clients, final_accuracy, wall_seconds, bytes_up, bytes_down, seed
    run_dir/model.pt        the final model (torch.load(run_dir / "model.pt", weights_only=False))
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import stat
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

CONFIG_FILE = "config.json"
PARTITION_FILE = "partition.csv"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"

REQUIRED_SUMMARY_KEYS = (
    "strategy", "dataset", "num_clients", "final_accuracy", "wall_seconds", "bytes_up", "bytes_down", "seed",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("fedsim", "flwr", "flwr-datasets", "ray", "torch", "torchvision", "numpy", "pandas"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return value


def _temporary_beside(path: Path) -> tuple[int, str]:
    """A new file next to ``path``, created with mode 0666 so the kernel applies the user's umask, exactly as a
    plain ``open(path, "w")`` would (``tempfile.mkstemp`` would make it 0600)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"cannot create a temporary file beside {path}")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` atomically (a killed run never leaves a half-written file).

    The file gets the mode a plain ``open()`` would give it: the existing file's mode when it is replaced, else
    0666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as fh:
            fh.write(data)
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))  # keep the mode of the file it replaces
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n")


class RunRecorder:
    """Writes one run directory; the only code that knows the file names and formats."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.tables: dict[str, pd.DataFrame] = {}

    def write_config(self, config: dict, **extra: Any) -> None:
        write_json(self.run_dir / CONFIG_FILE, {"config": config, "versions": package_versions(), **extra})

    def write_partition(self, table: pd.DataFrame) -> None:
        self.save_table(PARTITION_FILE, table, index=True)

    def append_metrics(self, row: dict) -> None:
        self.rows.append(_jsonable(row))
        atomic_write(self.run_dir / METRICS_FILE, pd.DataFrame(self.rows).to_csv(index=False))

    def save_table(self, name: str, table: pd.DataFrame, index: bool = True) -> None:
        self.tables[name] = table
        atomic_write(self.run_dir / name, table.to_csv(index=index))

    def write_summary(self, summary: dict) -> None:
        write_json(self.run_dir / SUMMARY_FILE, summary)

    def save_model(self, obj: Any) -> Path:
        import io

        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        path = self.run_dir / MODEL_FILE
        atomic_write(path, buf.getvalue())
        return path


def load_run(run_dir: str | Path) -> dict:
    """Read a run directory back: summary (dict), metrics (DataFrame), config (dict)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        raise FileNotFoundError(f"{run_dir}: no {SUMMARY_FILE}; is this a fedsim run directory?")
    out = {"dir": run_dir, "summary": json.loads(summary_path.read_text())}
    metrics = run_dir / METRICS_FILE
    out["metrics"] = pd.read_csv(metrics) if metrics.exists() and metrics.stat().st_size else pd.DataFrame()
    config = run_dir / CONFIG_FILE
    out["config"] = json.loads(config.read_text()) if config.exists() else {}
    return out


def completed_run_of(run_dir: str | Path, config: dict) -> bool | None:
    """Whether `run_dir` holds a completed run of exactly `config` (a resolved `ScenarioConfig.to_dict()`):
    True (same configuration), False (a completed run of another configuration), None (no completed run there).

    What `fedsim run --resume` and the benchmark scripts use to skip work already done.
    """
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        saved = json.loads((run_dir / CONFIG_FILE).read_text()).get("config")
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if summary.get("status") != "completed":
        return None
    return saved == json.loads(json.dumps(_jsonable(config)))
