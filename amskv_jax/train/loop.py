"""What both trainers share: the optimiser, a resumable jitted loop with a progress bar, and the loss log.

The loop's state is `{"params": ..., "opt_state": ...}`; the step number is the orbax checkpoint's step. Batches are
a pure function of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.

Runs survive a stop: checkpoints every `save_every` steps and at least every `SAVE_SECONDS` of wall time; SIGTERM
or SIGINT saves before the process ends; rerunning the same command resumes. Layout of a run directory `out/`
(by default outside the checkout, `default_run_dir`):
    out/run.json              what the run is (stage, model, data): a directory of another run is refused,
                              before anything is written in it (`check_identity`)
    out/checkpoints/<step>/   orbax checkpoints of the state (the latest few)
    out/loss_log.csv          one row per step: step, the step's metrics, lr, seconds since the run (re)started
    out/eval_log.csv          with an `evaluate` hook: one row every `save_every` steps and at the end
    out/config.json, params/  when finished: the ModelConfig and this stage's final variables (`save_params`)
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm import tqdm

from amskv_jax.checkpoint import load_checkpoint, save_checkpoint
from amskv_jax.config import ModelConfig
from amskv_jax.errors import UserError
from amskv_jax.train.configs import OptimConfig
from amskv_jax.untrusted import open_new, write_atomic

# A running stage saves at least this often (wall time), besides every `save_every` steps.
SAVE_SECONDS = 300.0
# Parameters exempt from weight decay (the reference's `nowd_keys`, plus biases and norms by rank).
_NO_DECAY = ("pos_1LC", "pos_start", "lvl_embed", "class_emb", "scale_mul_1H11", "embedding")


def schedule(opt: OptimConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        0.0, opt.lr, opt.warmup_steps, max(opt.steps, opt.warmup_steps + 1), end_value=opt.lr * opt.end_lr_ratio
    )


def optimizer(opt: OptimConfig) -> optax.GradientTransformation:
    def decay_mask(params):
        def decays(path, leaf):
            names = [getattr(k, "key", "") for k in path]
            return leaf.ndim >= 2 and not any(n in _NO_DECAY for n in names)

        return jax.tree_util.tree_map_with_path(decays, params)

    return optax.chain(
        optax.clip_by_global_norm(opt.grad_clip),
        optax.adamw(schedule(opt), b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
    )


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Rows of step `step`'s batch: epochs are seeded permutations of range(n), walked batch by batch."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if n < batch_size:
        return np.resize(perm, batch_size)
    return perm[k * batch_size:(k + 1) * batch_size]


class RunError(UserError):
    """A run directory that cannot be resumed: made by another stage or config, or a damaged checkpoint in it."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped a run after it saved its state; rerunning the same command resumes it."""

    def __init__(self, out: Path, step: int, signum: int):
        self.out, self.step, self.signum = out, step, signum
        super().__init__(f"{signal.Signals(signum).name} at step {step}: state saved in {out}; rerun the same "
                         f"command to resume")


def default_run_dir(config: str, stage: str) -> Path:
    """Where a training stage keeps its run by default, outside any checkout so that it survives a fresh clone:
    `$XDG_CACHE_HOME/amskv_jax/runs/<config>/<stage>` (`~/.cache/...` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "amskv_jax" / "runs" / config / stage


# What restoring a damaged or foreign checkpoint raises: tensorstore's errors, orbax's tree or shape mismatches and
# unreadable metadata JSON are ValueErrors, metadata missing an entry a KeyError, the file system an OSError (orbax
# wraps a failed array read in a bare Exception caused by one of them: `_file_error`). Anything else (a TypeError
# from a malformed state, say) is a bug and keeps its traceback.
RESTORE_ERRORS = (ValueError, KeyError, OSError)
# Identity keys added after run.json came to be: a run.json written before them lacks them, and is compared on the
# keys it has (its own "images", the number of images, is what "data" replaced), then gains them.
LATER_KEYS = ("data", "vqvae_run")


def check_identity(out: Path, identity: dict) -> None:
    """Refuse a run directory whose `run.json` describes another run (stage, model, data); write it on first use.
    A stage calls this before it writes anything in `out`, so a refused directory is left untouched.

    A directory with checkpoints but no run.json (a run from before run.json) is adopted: its checkpoint's
    structure is still checked on restore. A run.json without some of `LATER_KEYS` gains them."""
    path, identity = Path(out) / "run.json", json.loads(json.dumps(identity))  # tuples as JSON lists
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(identity, indent=1, sort_keys=True))
        return
    try:
        held = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: unreadable ({err}); remove the run directory or pick another --out") from None
    if not isinstance(held, dict):
        raise RunError(f"{path}: not a run description (a JSON object); remove the run directory or pick another "
                       f"--out")
    compared = [k for k in identity if k in held or k not in LATER_KEYS]
    differs = sorted(k for k in compared if held.get(k) != identity[k])
    if differs:
        raise RunError(f"{out}: holds another run (its {', '.join(differs)} differ from this command's); pick "
                       f"another --out or remove that directory")
    if len(compared) < len(identity):
        write_atomic(path, json.dumps({**held, **identity}, indent=1, sort_keys=True))


class _Signals:
    """Within the context, SIGTERM and SIGINT are recorded instead of ending the process (`.received`)."""

    def __enter__(self):
        self.received = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def _record(self, signum, frame):
        del frame
        self.received = signum

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def run(
    out: str | Path,
    state: dict,
    train_step: Callable[[dict, dict, jax.Array], tuple[dict, dict]],
    get_batch: Callable[[int], dict],
    opt: OptimConfig,
    desc: str,
    identity: dict,
    save_seconds: float = SAVE_SECONDS,
    evaluate: Callable[[dict], dict] | None = None,
) -> tuple[dict, int]:
    """Train `state` to `opt.steps` steps, resuming from the latest checkpoint in `out/checkpoints`.

    `train_step(state, batch, key) -> (state, metrics)` is jitted here; `key` is `fold_in(seed key, step)`.
    `identity` (JSON data: stage, model, data) must match the directory's `run.json` (`check_identity`; a stage
    that writes in `out` before this, e.g. a data cache, checks it first itself).
    Saves every `opt.save_every` steps, whenever `save_seconds` of wall time passed since the last save, and at the
    end. `evaluate(state) -> metrics`, if given, runs every `save_every` steps and after the last one; its rows go
    to out/eval_log.csv (e.g. held-out NLL beside train NLL). SIGTERM or SIGINT ends the current step, saves, and
    raises `TrainingInterrupted`. Orbax commits a
    checkpoint by renaming a finished temporary directory, so a process killed even mid-save leaves the previous
    one loadable. Returns (state, steps done).
    """
    out = Path(out).absolute()
    check_identity(out, identity)
    # Synchronous saves: the jitted step donates the state buffers an async save could still be reading.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=2, save_interval_steps=opt.save_every, enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    lr_at = schedule(opt)
    step_fn = jax.jit(train_step, donate_argnums=0)
    base_key = jax.random.key(opt.seed)
    with _Signals() as signals, ocp.CheckpointManager(out / "checkpoints", options=options) as manager:
        start = manager.latest_step() or 0
        if start:
            state = _restore(manager, start, state, out)
        log = _LossLog(out / "loss_log.csv", start)
        eval_log = _LossLog(out / "eval_log.csv", start)
        t0 = last_save = time.perf_counter()
        bar = tqdm(range(start, opt.steps), initial=start, total=opt.steps, desc=desc, dynamic_ncols=True)
        done = start  # the last step whose state `state` holds
        for step in bar:
            if signals.received:
                break
            state, metrics = step_fn(state, get_batch(step), jax.random.fold_in(base_key, step))
            done = step + 1
            metrics = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()}, refresh=False)
            log.write(step + 1, metrics, float(lr_at(step)), time.perf_counter() - t0)
            due = step + 1 == opt.steps or time.perf_counter() - last_save >= save_seconds
            if manager.save(step + 1, args=ocp.args.StandardSave(state), force=bool(due)):
                last_save = time.perf_counter()
            if evaluate is not None and ((step + 1) % opt.save_every == 0 or step + 1 == opt.steps):
                scores = {k: float(v) for k, v in evaluate(state).items()}
                eval_log.write(step + 1, scores, float(lr_at(step)), time.perf_counter() - t0)
                bar.write(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        bar.close()
        # a signal stopped the run: save its last step, wherever in that step the signal came (nothing logged lost)
        if signals.received and done > (manager.latest_step() or 0):
            manager.save(done, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
        log.close()
        eval_log.close()
    if signals.received:
        raise TrainingInterrupted(out, manager.latest_step() or 0, signals.received)
    return state, max(start, opt.steps)


def _restore(manager: ocp.CheckpointManager, step: int, state: dict, out: Path) -> dict:
    """The state of checkpoint `step`, shaped like `state`; any failure names the directory (never a fresh start
    over it)."""
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(state))
    except Exception as err:  # narrowed here: only what the files cause becomes a RunError
        cause = _file_error(err)
        if cause is None:
            raise
        message = " ".join(str(cause).split())[:300]
        raise RunError(f"{out}/checkpoints/{step}: cannot be restored into this run ({type(cause).__name__}: "
                       f"{message}); remove it to resume from an earlier checkpoint, or pick another --out") from err


def _file_error(err: BaseException) -> BaseException | None:
    """The error of the checkpoint's files behind a restore's `err` (one of `RESTORE_ERRORS`), else None: orbax
    raises a failed array read as a bare `Exception` caused by tensorstore's error."""
    while type(err) is Exception and err.__cause__ is not None:
        err = err.__cause__
    return err if isinstance(err, RESTORE_ERRORS) else None


class _LossLog:
    """Appends rows to loss_log.csv; on resume drops rows past the restored step (they were never saved)."""

    def __init__(self, path: Path, start: int):
        rows = []
        if start and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        self.path, self.rows, self.file, self.writer = path, rows, None, None

    def write(self, step: int, metrics: dict, lr: float, seconds: float) -> None:
        row = {"step": step, **metrics, "lr": lr, "seconds": round(seconds, 2)}
        if self.writer is None:
            self.file = open_new(self.path, "w", newline="")
            self.writer = csv.DictWriter(self.file, fieldnames=list(row))
            self.writer.writeheader()
            self.writer.writerows(self.rows)
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def cached_arrays(path: Path, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays `compute()` returns, kept in the .npz file `path` beside the text `key` (what they were computed
    from): read back when the file holds the same key, else computed and written whole (`write_atomic`: a stop never
    leaves half a cache), replacing a cache of another key."""
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            if "key" in data.files and str(data["key"]) == key:
                return {name: data[name] for name in data.files if name != "key"}
    arrays = compute()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays, key=key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return arrays


def params_digest(variables) -> str:
    """A digest of a tree of arrays (each leaf's path, dtype, shape and bytes): names a trained model's weights, e.g.
    the VQ-VAE a VAR run trains on, wherever its directory is."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        array = np.ascontiguousarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)} {array.dtype} {array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def read_log(out: str | Path, name: str = "loss_log.csv") -> list[dict]:
    """A run's log (loss_log.csv, or eval_log.csv) as a list of {column: float}."""
    with (Path(out) / name).open() as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def cast_floats(tree, dtype) -> dict:
    """Every floating leaf of `tree` as `dtype` (numpy), integers untouched."""
    def cast(x):
        x = np.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree.map(cast, tree)


def save_params(out: str | Path, model: ModelConfig, variables: dict) -> None:
    """A finished run: out/config.json (the whole ModelConfig), out/params/ (this stage's Flax variables) and their
    checksums, through `checkpoint.save_checkpoint` (a previous params/ is replaced)."""
    out = Path(out).absolute()
    if (out / "params").exists():
        shutil.rmtree(out / "params")
    save_checkpoint(out, model, variables)


def load_params(run: str | Path, verify: bool | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, variables) of a finished run written by `save_params` (`verify`: as `load_checkpoint`)."""
    run = Path(run).absolute()
    if not (run / "config.json").is_file() or not (run / "params").is_dir():
        raise FileNotFoundError(f"{run}: not a finished training run (needs config.json and params/)")
    return load_checkpoint(run, verify)
