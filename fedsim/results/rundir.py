"""Run directories: what a run leaves behind, written so that an interrupted run keeps everything so far.

Every file is replaced atomically (write to a temporary file, then rename), and metrics.csv is rewritten after
each round, so a killed run leaves complete files describing the rounds it finished.

    run_dir/config.json     resolved scenario, package versions, seed
    run_dir/partition.csv   clients x classes sample counts (+ size)
    run_dir/metrics.csv     one row per round / stream step
    run_dir/summary.json    strategy, dataset, num_clients, final_accuracy, wall_seconds, bytes_up, bytes_down, seed
    run_dir/model.pt        the final model, pickled (torch.load(run_dir / "model.pt", weights_only=False); needs fedsim)
    run_dir/model_state.pt  the same model's state_dict (torch.load(..., weights_only=True) loads it; ``load_model``
                            rebuilds the module from it and config.json's "saved_model": class, model, input shape)
    run_dir/tensorboard/    [logging] tensorboard: the metrics rows as TensorBoard scalars
    run_dir/mlflow.db       [logging] mlflow without mlflow_tracking_uri: the run in MLflow (fedsim.results.tracking)
    run_dir/.fedsim-files   the names of the files fedsim wrote here (so it replaces only its own files)

A run starts by invalidating the previous run in its directory: summary.json goes first (so a crash in between
never leaves a stale "completed" beside a new config.json), then the other files the previous run listed in
.fedsim-files; files fedsim did not write are never deleted.

One run at a time per directory: a run holds ``run_dir/.fedsim-lock`` (``fcntl.flock``, exclusive, non-blocking)
from its ``--resume``/``--overwrite`` checks to its end (``lock_run_dir``; ``RunRecorder.start`` takes it too), and
a second fedsim run into the same directory is refused with ``RunDirLocked``. The kernel drops the lock when the
holder exits, ``kill -9`` included; the file is removed on a normal release. A process started below the holder
(the ServerApp of ``fedsim deploy``, which holds its run directories while the federation runs them) writes under
its ancestor's lock.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import platform
import secrets
import stat
import threading
import weakref
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedsim.errors import FedsimError
from fedsim.results.figures import FIGURE_FILES

CONFIG_FILE = "config.json"
PARTITION_FILE = "partition.csv"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"
MODEL_STATE_FILE = "model_state.pt"  # the state_dict of model.pt's module: tensors only (weights_only=True)
MANIFEST_FILE = ".fedsim-files"
LOCK_FILE = ".fedsim-lock"  # held (flock) by the fedsim run writing this directory
TENSORBOARD_DIR = "tensorboard"  # event files of logging.tensorboard
REPORT_FILES = ("report.csv", *FIGURE_FILES, "statistics.csv", "plan.json")  # what fedsim report writes
RUN_FILES = (CONFIG_FILE, PARTITION_FILE, METRICS_FILE, SUMMARY_FILE, MODEL_FILE, MODEL_STATE_FILE)

REQUIRED_SUMMARY_KEYS = (
    "strategy", "dataset", "num_clients", "final_accuracy", "wall_seconds", "bytes_up", "bytes_down", "seed",
)


def default_out(scenario: str | None) -> Path:
    """The run directory when none is given (``runs/<scenario stem>-<time>``): one definition for ``fedsim run``,
    ``fedsim deploy`` and the Flower app, so every way of running a scenario puts it in the same place."""
    stem = Path(scenario).stem if scenario else "run"
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stem}-{stamp}"


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


def _json_text(payload: dict) -> str:
    return json.dumps(_jsonable(payload), indent=2, sort_keys=False) + "\n"


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, _json_text(payload))


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def written_files(directory: str | Path) -> set[str]:
    """The names fedsim recorded as written in ``directory`` (its .fedsim-files), plus the fixed run-file names
    when the directory holds a fedsim config.json from before the manifest existed."""
    directory = Path(directory)
    try:
        names = {line for line in (directory / MANIFEST_FILE).read_text(encoding="utf-8").splitlines() if line}
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        names = set()
        if _read_config(directory) is not None:
            names = set(RUN_FILES)
    return {n for n in names if n and "/" not in n and n not in (".", "..")}


def record_written(directory: str | Path, names: Iterable[str]) -> None:
    """Add ``names`` to ``directory``'s list of files fedsim wrote (report files, for instance)."""
    directory = Path(directory)
    known = written_files(directory) if (directory / MANIFEST_FILE).exists() else set()
    new = known | set(names)
    if new != known:
        atomic_write(directory / MANIFEST_FILE, "".join(f"{n}\n" for n in sorted(new)))


def _legacy_names(directory: Path) -> set[str]:
    """Names fedsim itself would have written in a directory from before .fedsim-files existed: the strategies'
    tables (*.csv) in a run directory, the report files beside fedsim run directories. Only for deciding what
    counts as foreign (a refusal); nothing is ever deleted on this guess."""
    if (directory / MANIFEST_FILE).exists():
        return set()
    names: set[str] = set()
    if _read_config(directory) is not None:
        names |= {p.name for p in directory.glob("*.csv")} | set(REPORT_FILES)
    if any(_read_config(d) is not None for d in directory.iterdir() if d.is_dir()):
        names |= set(REPORT_FILES)
    return names


def foreign_files(directory: str | Path, also_ours: Iterable[str] = ()) -> list[str]:
    """Entries of ``directory`` that fedsim did not write (sorted); [] for a missing or empty directory."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    ours = written_files(directory) | _legacy_names(directory) | {MANIFEST_FILE, LOCK_FILE} | set(also_ours)
    return sorted(p.name for p in directory.iterdir() if p.name not in ours and not _is_temporary(p.name))


def refuse_foreign_report_files(out: str | Path) -> None:
    """Refuse an ``--out`` holding report files (``REPORT_FILES``) that fedsim did not write: the report written
    beside several variants' run directories would replace them. Callers skip this under ``--overwrite``."""
    from fedsim.errors import ConfigError

    taken = [n for n in foreign_files(out) if n in REPORT_FILES]
    if taken:
        raise ConfigError(f"--out: {out} holds {', '.join(taken)} that fedsim did not write; choose another "
                          "--out, or pass --overwrite to replace them")


class RunDirLocked(FedsimError):
    """Another fedsim run holds the run directory (its ``.fedsim-lock``)."""


_HELD: dict[str, list] = {}  # realpath -> [fd or None, count, the folders this process created for it]
_HELD_LOCK = threading.Lock()


def _holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat_line = fh.read().decode("ascii", "replace")
        return int(stat_line.rsplit(")", 1)[1].split()[1])  # the field after the state; comm may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _is_ancestor(pid: int) -> bool:
    """Whether ``pid`` is a parent, grandparent, ... of this process (Linux /proc; False elsewhere)."""
    current = os.getppid()
    for _ in range(64):
        if current is None or current <= 1:
            return False
        if current == pid:
            return True
        current = _parent_pid(current)
    return False


class RunDirLock:
    """This process's hold on one run directory (``lock_run_dir``); ``release()`` once per acquisition."""

    def __init__(self, key: str, run_dir: Path) -> None:
        self.key, self.run_dir, self.released = key, run_dir, False

    def release(self) -> None:
        with _HELD_LOCK:
            if self.released:
                return
            self.released = True
            entry = _HELD.get(self.key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self.key]
            fd, _, created = entry
            if fd is not None:
                with contextlib.suppress(OSError):  # removed while still held: nobody can lock a stale inode
                    os.unlink(self.run_dir / LOCK_FILE)
                os.close(fd)
            for folder in created:  # deepest first; only where nothing was written (a refused check)
                try:
                    folder.rmdir()
                except OSError:
                    break

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_run_dir(run_dir: str | Path) -> RunDirLock:
    """Hold ``run_dir`` (created if missing) for this process's run; ``RunDirLocked`` naming it when another
    fedsim run holds it. Re-entrant within a process (the CLI holds it from the checks on, the run takes it
    again); a process below the holder (``fedsim deploy``'s ServerApp) writes under its ancestor's lock. Where the
    file system offers no locks (or the directory is read-only), nothing is locked."""
    from fedsim.errors import ConfigError

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} is a file, not a directory; give a directory for the run")
    key = os.path.realpath(run_dir)
    with _HELD_LOCK:
        if key in _HELD:
            _HELD[key][1] += 1
            return RunDirLock(key, run_dir)
        created = []
        probe = run_dir
        while not probe.exists() and probe != probe.parent:
            created.append(probe)
            probe = probe.parent
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = _acquire(run_dir)
        except BaseException:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise
        _HELD[key] = [fd, 1, created]
        return RunDirLock(key, run_dir)


def _acquire(run_dir: Path) -> int | None:
    import fcntl

    path = run_dir / LOCK_FILE
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None  # nothing can be written here: the checks or the writes say so, naming the file
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            os.close(fd)
            if holder is not None and _is_ancestor(holder):
                return None  # our parent's run (fedsim deploy's ServerApp): it holds the lock for us
            who = f" (process {holder})" if holder is not None else ""
            raise RunDirLocked(f"--out: {run_dir} is in use: another fedsim run{who} is writing it; wait for that "
                               "run to end, or choose another --out") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                return None  # a file system without locks
            raise
        try:  # the file may have been removed by the previous holder between our open and our flock
            if os.stat(path).st_ino != os.fstat(fd).st_ino:
                raise FileNotFoundError(path)
        except FileNotFoundError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    raise RunDirLocked(f"--out: {run_dir}: could not lock {LOCK_FILE} (another fedsim run keeps replacing it)")


class RunClosed(FedsimError):
    """A write to a run directory after its run ended (a server part still running after an interrupt)."""


class RunRecorder:
    """Writes one run directory; the only code that knows the file names and formats.

    Thread-safe (the server part writes from Flower's server thread while a signal handler in the main thread
    may write the summary); after ``close()`` every write raises ``RunClosed``.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self.tables: dict[str, pd.DataFrame] = {}
        self.closed = False
        self._lock = threading.RLock()
        self._written: set[str] = set()
        self._tensorboard = False  # config logging.tensorboard: metrics rows as scalars in TENSORBOARD_DIR
        self._tb_writer: Any = None
        self._dir_lock: RunDirLock | None = None  # held from start() to close()
        self._config_entry: tuple[dict, dict] = ({}, {})  # write_config's arguments
        self._mlflow: Any = None  # fedsim.results.tracking.MlflowTracker under logging.mlflow
        self._last_summary: dict | None = None

    def _write(self, name: str, data: bytes | str, *, after_close: bool = False) -> Path:
        with self._lock:
            if self.closed and not after_close:
                raise RunClosed(f"{self.run_dir / name}: the run has ended; nothing more is written")
            if name not in self._written:
                self._written.add(name)
                record_written(self.run_dir, [name])  # listed before it exists: a crash never hides a file
            path = self.run_dir / name
            atomic_write(path, data)
            return path

    def start(self, config: dict, keep: Iterable[str] = (), **extra: Any) -> None:
        """Begin a run here: invalidate the previous run (its summary first, then its other files but ``keep``:
        the checkpoint a resumed run continues from), write config.json."""
        with self._lock:
            if self._dir_lock is None:  # RunDirLocked (nothing touched) when another fedsim run writes here
                self._dir_lock = lock_run_dir(self.run_dir)
                weakref.finalize(self, self._dir_lock.release)
            previous = written_files(self.run_dir)
            kept = {n for n in keep if n in previous}
            for name in [SUMMARY_FILE] + sorted(previous - {SUMMARY_FILE} - kept):
                path = self.run_dir / name
                if path.is_file() or path.is_symlink():
                    path.unlink()
            if (self.run_dir / MANIFEST_FILE).exists():
                (self.run_dir / MANIFEST_FILE).unlink()
            self._written.clear()
            if kept:
                record_written(self.run_dir, kept)
            self._tensorboard = bool((config.get("logging") or {}).get("tensorboard"))
            tb_dir = self.run_dir / TENSORBOARD_DIR
            if TENSORBOARD_DIR in previous and tb_dir.is_dir():  # the previous run's event files, none other
                for event in tb_dir.glob("events.out.tfevents.*"):
                    event.unlink()
                with contextlib.suppress(OSError):  # left where it holds files fedsim did not write
                    tb_dir.rmdir()
            self.write_config(config, **extra)
            if (config.get("logging") or {}).get("mlflow"):
                self._start_mlflow(config, extra)

    def _start_mlflow(self, config: dict, extra: dict) -> None:
        from fedsim.results.tracking import MLFLOW_DB, MlflowTracker

        if not (config.get("logging") or {}).get("mlflow_tracking_uri"):
            self._written.add(MLFLOW_DB)
            record_written(self.run_dir, [MLFLOW_DB])  # the run's own store: replaced with the run
        try:
            self._mlflow = MlflowTracker(self.run_dir, config, label=extra.get("label"), seed=extra.get("seed"))
        except Exception as exc:  # noqa: BLE001  (whatever MLflow raises for a store it cannot open)
            uri = (config.get("logging") or {}).get("mlflow_tracking_uri") or str(self.run_dir / MLFLOW_DB)
            raise FedsimError(f"logging.mlflow: cannot open the MLflow store {uri}: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc

    def write_config(self, config: dict, **extra: Any) -> None:
        self._config_entry = (config, dict(extra))  # rewritten with "saved_model" when the model is saved
        self._write(CONFIG_FILE, _json_text({"config": config, "versions": package_versions(), **extra}))

    def write_partition(self, table: pd.DataFrame) -> None:
        self.save_table(PARTITION_FILE, table, index=True)

    def append_metrics(self, row: dict) -> None:
        with self._lock:
            if self.closed:
                raise RunClosed(f"{self.run_dir / METRICS_FILE}: the run has ended; nothing more is written")
            self.rows.append(_jsonable(row))
            self._write(METRICS_FILE, pd.DataFrame(self.rows).to_csv(index=False))
            if self._tensorboard:
                self._log_scalars(self.rows[-1])
            if self._mlflow is not None:
                self._mlflow.log_row(self.rows[-1])

    def restore_rows(self, rows: list[dict]) -> None:
        """The metrics rows of the rounds a resumed run finished before (``fedsim.engine.checkpoint``): written
        to metrics.csv and the trackers, as ``append_metrics`` wrote them then."""
        with self._lock:
            self.rows = []
            for row in rows:
                self.append_metrics(row)

    def _log_scalars(self, row: dict) -> None:
        """One metrics row as TensorBoard scalars (numeric columns; step = the row's round)."""
        if self._tb_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            if TENSORBOARD_DIR not in self._written:
                self._written.add(TENSORBOARD_DIR)
                record_written(self.run_dir, [TENSORBOARD_DIR])
            self._tb_writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))
        step = row.get("round")
        step = int(step) if isinstance(step, (int, float)) and step == step else len(self.rows)
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
                self._tb_writer.add_scalar(key, value, step)
        self._tb_writer.flush()

    def save_table(self, name: str, table: pd.DataFrame, index: bool = True) -> None:
        self.tables[name] = table
        self._write(name, table.to_csv(index=index))

    def save_text(self, name: str, text: str) -> None:
        """A file already rendered (clients.csv, whose unchanged rounds the server renders once)."""
        self._write(name, text)

    def write_summary(self, summary: dict) -> None:
        self._last_summary = summary
        self._write(SUMMARY_FILE, _json_text(summary), after_close=True)

    def save_model(self, obj: Any, architecture: dict | None = None) -> Path:
        """model.pt (``obj`` pickled) and, for a ``torch.nn.Module``, model_state.pt (its state_dict, which
        ``torch.load(..., weights_only=True)`` reads) with ``architecture`` (what rebuilds the module: class,
        model name and parameters, num_classes, input shape) as config.json's "saved_model"."""
        import io

        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        path = self._write(MODEL_FILE, buf.getvalue())
        if isinstance(obj, torch.nn.Module):
            state = {k: v.detach().cpu().clone() for k, v in obj.state_dict().items()}
            buf = io.BytesIO()
            torch.save(state, buf)
            self._write(MODEL_STATE_FILE, buf.getvalue())
            entry = {"pickled": MODEL_FILE, "state_dict": MODEL_STATE_FILE,
                     "module": f"{type(obj).__module__}.{type(obj).__qualname__}", **(architecture or {})}
            config, extra = self._config_entry
            self.write_config(config, **{**extra, "saved_model": entry})
        return path

    def close(self) -> None:
        """The run has ended: later writes (a server thread still running after an interrupt) raise."""
        with self._lock:
            self.closed = True
            if self._tb_writer is not None:
                self._tb_writer.close()
                self._tb_writer = None
            if self._mlflow is not None:
                tracker, self._mlflow = self._mlflow, None
                with contextlib.suppress(Exception):  # the run's files are written; tracking must not fail it
                    tracker.finish(self._last_summary)
            if self._dir_lock is not None:
                self._dir_lock.release()


class UnreadableRun(FedsimError):
    """A run directory whose summary.json, metrics.csv or config.json cannot be read (truncated, not JSON/CSV)."""


def _read_json(path: Path) -> Any:
    """A JSON file's content; ``UnreadableRun`` naming the file when it is truncated, binary or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableRun(f"{path}: not a JSON file ({type(err).__name__}: {err}); truncated or overwritten?"
                            ) from None


def _read_config(run_dir: Path) -> dict | None:
    """The scenario saved in run_dir/config.json, or None where there is no readable fedsim config."""
    try:
        saved = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return saved.get("config") if isinstance(saved, dict) and isinstance(saved.get("config"), dict) else None


def load_run(run_dir: str | Path) -> dict:
    """Read a run directory back: summary (dict), metrics (DataFrame), config (dict).

    Raises ``UnreadableRun`` (naming the file) when a file is truncated, binary or of the wrong format.
    """
    run_dir = Path(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.exists():
        raise FileNotFoundError(f"{run_dir}: no {SUMMARY_FILE}; is this a fedsim run directory?")
    summary = _read_json(summary_path)
    if not isinstance(summary, dict):
        raise UnreadableRun(f"{summary_path}: holds a JSON {type(summary).__name__}, not a run summary")
    out = {"dir": run_dir, "summary": summary}
    metrics = run_dir / METRICS_FILE
    try:
        out["metrics"] = pd.read_csv(metrics) if metrics.exists() and metrics.stat().st_size else pd.DataFrame()
    except (UnicodeDecodeError, ValueError, pd.errors.ParserError) as err:
        raise UnreadableRun(f"{metrics}: not a CSV file ({type(err).__name__}: {_first_line(err)})") from None
    if not out["metrics"].empty and "round" not in out["metrics"].columns:
        raise UnreadableRun(f"{metrics}: not a fedsim metrics file (no 'round' column)")
    config = run_dir / CONFIG_FILE
    out["config"] = _read_json(config) if config.exists() else {}
    return out


def load_model(run_dir: str | Path, device: str = "cpu") -> Any:
    """The run's final model rebuilt without unpickling code: the scenario's network (``fedsim.scenario.
    scenario_model`` from config.json) with model_state.pt's weights, read with ``weights_only=True``. For the
    runs whose saved module is the scenario's network (config.json: "saved_model"."scenario_model" true: the
    model-round strategies, the centralized and one-shot averaging baselines); other modules (AFL's feature map
    and ridge head, FuseFL's fused network, ...) load from model.pt, or from model_state.pt into a module of the
    class config.json names."""
    import torch

    from fedsim.config import config_from_dict
    from fedsim.scenario import scenario_model

    run_dir = Path(run_dir)
    saved = _read_json(run_dir / CONFIG_FILE)
    entry = saved.get("saved_model") or {}
    if not entry.get("scenario_model"):
        raise FedsimError(f"{run_dir}: the saved model ({entry.get('module', 'unknown class')}) is not the "
                          "scenario's network; load model.pt (torch.load(..., weights_only=False)) or put "
                          f"{MODEL_STATE_FILE} into a module of that class")
    config = config_from_dict(saved["config"])
    model = scenario_model(config, int(entry["num_classes"]), tuple(entry["input_shape"]))
    state = torch.load(run_dir / entry.get("state_dict", MODEL_STATE_FILE), map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else ""


def completed_run_of(run_dir: str | Path, config: dict) -> bool | None:
    """Whether `run_dir` holds a completed run of exactly `config` (a resolved `ScenarioConfig.to_dict()`):
    True (same configuration), False (a completed run of another configuration), None (no completed run there).

    What `fedsim run --resume` and the benchmark scripts use to skip work already done. An unreadable summary or
    config counts as no completed run, and so does a completed run of the same configuration whose metrics.csv
    is missing or unreadable (it is run again rather than trusted).
    """
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    saved = _read_config(run_dir)
    if not isinstance(summary, dict) or summary.get("status") != "completed" or saved is None:
        return None
    wanted = json.loads(json.dumps(_jsonable(config)))
    saved, wanted = dict(saved), dict(wanted)
    saved.pop("logging", None)  # tracking (TensorBoard) changes no result: a run with it is the same run
    wanted.pop("logging", None)
    if saved != wanted:
        return False
    return True if _metrics_intact(run_dir) else None


def _metrics_intact(run_dir: Path) -> bool:
    """Whether run_dir's metrics.csv reads back as fedsim metrics (or the run never wrote one)."""
    metrics = run_dir / METRICS_FILE
    if not metrics.exists():
        return METRICS_FILE not in written_files(run_dir)
    try:
        if not metrics.is_file() or not metrics.stat().st_size:  # fedsim writes a header at least
            return False
        frame = pd.read_csv(metrics)
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError):
        return False
    return frame.empty or "round" in frame.columns


def check_run_dir(run_dir: str | Path, config: dict, *, resume: bool = False, overwrite: bool = False,
                  label: str | None = None) -> bool:
    """Whether ``fedsim run`` may write a run of ``config`` into ``run_dir``: True (run it), False (``resume`` and
    it completed there earlier with the same configuration: skip it); raises ``FedsimError`` where running would
    replace something it should not.

    Without ``overwrite``, a completed run of another configuration and files fedsim did not write are refused;
    an interrupted or failed run, or a completed one of the same configuration, is replaced.
    """
    from fedsim.errors import ConfigError

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} is a file, not a directory; give a directory for the run")
    if not run_dir.exists():
        return True
    done = completed_run_of(run_dir, config)
    variant = f" (variant {label!r})" if label else ""
    if resume:
        if done:
            return False
        if done is False:
            raise FedsimError(f"--resume: {run_dir} holds a completed run of a different configuration{variant}; "
                              "choose another --out or remove that directory")
    if overwrite:
        return True
    if done is False:
        raise ConfigError(f"--out: {run_dir} holds a completed run of a different configuration{variant}; choose "
                          "another --out, or pass --overwrite to replace it")
    foreign = foreign_files(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"--out: {run_dir} holds files fedsim did not write ({shown}); choose a new or empty "
                          "directory, or pass --overwrite (fedsim then writes its own files there and deletes "
                          "nothing it did not write)")
    return True
