"""One run per folder: claimed under a lock, never mixed with another run, resumed only as it was trained.

    on_rank_0(check_out_folder, cfg.out, cfg.resume, cfg.overwrite)  # first: refuse a folder that holds another run
    ... load and check the inputs ...
    lock, resumed = open_run(cfg.out, settings, resume=cfg.resume, overwrite=cfg.overwrite, safe=RESUME_SAFE)

- A folder that holds anything is refused unless --resume true (continue it) or --overwrite true (delete it), and
  either is refused unless the folder holds a run and nothing else (RUN_ENTRIES; a config.json a run saved): an
  --out pointed at the wrong folder is never deleted or written into.
- The folder's `.lock` file is locked (flock) for the life of the process and holds its PID. The kernel drops the
  lock when the process dies however it dies, so a lock file left by a killed run is stale by definition: it is
  taken over, and the old PID is printed. A child forked by the run (a math-check worker) closes its copy of the
  lock file first thing, so that a child left behind cannot keep a dead run's lock.
- Leftovers of a write a crash cut short (`*.tmp-*`, `*.old-*`) are cleaned (vlaa_min.infra.checkpoint.clean_leftovers).
- `settings` (the config plus the inputs' content hashes) is saved in config.json and in every checkpoint. On
  resume, every field that shapes training must equal the checkpoint's; the `safe` fields (eval cadence, logging,
  device) may change, and each change is printed.
"""

import hashlib
import json
import math
import os
import re
import shutil
import weakref

from vlaa_min.infra import distributed
from vlaa_min.infra.checkpoint import clean_leftovers
from vlaa_min.infra.cli import ConfigError, UserError, save_config
from vlaa_min.infra.train_state import latest_checkpoint, load_newest

LOCK_FILE = ".lock"
_held_locks = weakref.WeakSet()  # the open lock files of this process
ALWAYS_SAFE = frozenset({"out", "resume", "overwrite"})  # how a run is started, not how it trains
# What runs write into their folder: the trainers, control.py's and experiment.py's results, the viewer's page.
RUN_ENTRIES = frozenset({LOCK_FILE, "config.json", "metrics.jsonl", "checkpoints", "model", "rollouts.jsonl",
                         "rollouts.html", "curves.png", "eval.md", "eval.json", "history.json"})
INTERRUPTED_WRITE = re.compile(r".+\.(tmp|tmp-.+|old-.+)")  # "config.json.tmp", "model.tmp-<tag>": cut short


def check_out_folder(out: str, resume: bool, overwrite: bool, holds: str = "a run", resumable: bool = True) -> None:
    """Refuse an --out that holds another run (evaluate.py: holds="results", nothing to resume) unless the user said
    what to do with it (rank 0 checks)."""
    if resume and overwrite:
        raise ConfigError("--resume true and --overwrite true exclude each other")
    if not distributed.is_main():
        return  # rank 0 may already have claimed the folder for this very run
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder")
    held = os.path.isdir(out) and any(name != LOCK_FILE for name in os.listdir(out))
    if held and not (resume or overwrite):
        resume_hint = "continue it with --resume true, " if resumable else ""
        raise UserError(f"--out {out} already holds {holds}: {resume_hint}replace it with --overwrite true, or choose "
                        f"another --out")
    if held and resumable:  # a training run's folder, which --overwrite deletes and --resume writes into
        check_holds_only_a_run(out, "--overwrite true" if overwrite else "--resume true")


def check_holds_only_a_run(out: str, action: str) -> None:
    """Refuse to act on a folder that holds anything a run does not write, or a config.json that is not a run's
    (a model folder's, say); the message names what is there."""
    names = sorted(os.listdir(out))
    foreign = [name for name in names if name not in RUN_ENTRIES and not INTERRUPTED_WRITE.fullmatch(name)]
    if "config.json" in names and not _is_run_config(os.path.join(out, "config.json")):
        foreign.insert(0, "config.json (not a run's)")
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"--out {out} does not hold only a run: it holds {shown}; {action} acts only on a folder "
                        f"a run made, so nothing was deleted or written. Choose another --out")


def _is_run_config(path: str) -> bool:
    """Whether `path` is the config.json a run saved (open_run: the run's flags, --out and --resume among them)."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(saved, dict) and ALWAYS_SAFE <= saved.keys()


def take_lock(out: str):
    """Lock out/.lock for this process (the open file holds the lock) and write our PID into it."""
    import fcntl  # Unix only, like the rest of the trainers' process handling

    path = os.path.join(out, LOCK_FILE)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise UserError(f"--out {out} is in use by another run (process {holder}, lock file {path}); wait for it "
                        f"to end or choose another --out") from None
    lock.seek(0)
    stale = lock.read().strip()
    if stale:
        print(f"{path}: taking over the lock of process {stale}, which is no longer running")
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    _held_locks.add(lock)
    return lock


def _close_inherited_locks() -> None:
    """In a forked child: close the lock files it inherited. flock's lock belongs to the open file, which parent
    and child then share: a child that outlived its parent would hold the run's lock. Closing the child's copy
    leaves the parent's lock alone (only the last close, or LOCK_UN, releases it)."""
    for lock in list(_held_locks):
        lock.close()
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def release_lock(lock) -> None:
    """Empty the lock file (an empty lock is a clean end) and drop the lock (ranks > 0 hold none)."""
    if lock is None:
        return
    lock.seek(0)
    lock.truncate()
    lock.close()
    _held_locks.discard(lock)


def check_model_dir(path: str, flag: str = "--model") -> None:
    """A model must be a local checkpoint folder: say so at once instead of failing deep inside a loader."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such directory (a local checkpoint folder is needed)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{flag} {path}: no config.json in it; is it a finished model folder?")


def file_sha256(path: str | None) -> str | None:
    if not path:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flag(name: str) -> str:
    """'eval_every' -> '--eval-every'; 'data_sha256' -> 'the content of --data'."""
    if name.endswith("_sha256"):
        return "the content of " + _flag(name.removesuffix("_sha256"))
    return "--" + name.replace("_", "-")


def check_resume_settings(checkpoint: str, saved: dict, current: dict, safe: frozenset[str]) -> None:
    """Refuse a resume under settings that shape training differently; print the safe changes."""
    changed = {name: (saved[name], value) for name, value in current.items() if name in saved and saved[name] != value}
    refused = [f"{_flag(name)} {new!r} (trained with {old!r})" for name, (old, new) in changed.items()
               if name not in safe | ALWAYS_SAFE]
    if refused:
        raise UserError(f"cannot resume {checkpoint}: settings that shape training differ from the run's:\n  "
                        + "\n  ".join(refused) + "\nresume with the run's settings, or start a new run in another "
                        "--out")
    for name, (old, new) in changed.items():
        if name not in ALWAYS_SAFE:
            print(f"resuming with {_flag(name)} {new!r} (was {old!r})")


def open_run(out: str, settings: dict, *, resume: bool, overwrite: bool, safe: frozenset[str]):
    """Claim `out` (see the module docstring); returns (lock, (checkpoint, state, weights) or None).

    Under torchrun rank 0 claims and prepares the folder; the other ranks wait for it, then load the same
    checkpoint (their lock is None).
    """
    claimed = on_rank_0(_claim_run, out, settings, resume=resume, overwrite=overwrite, safe=safe)
    if not distributed.is_main():  # rank 0 has claimed and cleaned the folder, and deleted broken checkpoints
        return None, load_newest(out) if resume else None
    return claimed


def on_rank_0(check, *args, **kwargs):
    """check(*args, **kwargs) on rank 0 alone, the other ranks waiting for it; its error is raised on every rank.
    So a check only rank 0 makes (the --out folder, the lock, resume's settings) stops every rank with its message,
    not rank 0 alone while the others crash on a collective it left. Every rank must call it (a collective)."""
    result, error = None, None
    if distributed.is_main():
        try:
            result = check(*args, **kwargs)
        except Exception as raised:
            error = raised
    message = distributed.broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise UserError(message)
    return result


def _claim_run(out: str, settings: dict, *, resume: bool, overwrite: bool, safe: frozenset[str]):
    check_out_folder(out, resume, overwrite)
    os.makedirs(out, exist_ok=True)
    lock = take_lock(out)
    try:
        return lock, _prepare_run(out, settings, resume=resume, overwrite=overwrite, safe=safe)
    except BaseException:
        release_lock(lock)  # a refused resume (or any stop here) leaves no lock for the next run to take over
        raise


def _prepare_run(out: str, settings: dict, *, resume: bool, overwrite: bool, safe: frozenset[str]):
    """The claimed folder made ready: emptied (overwrite), leftovers cleaned, the checkpoint to resume checked."""
    check_out_folder(out, resume, overwrite)  # again, under the lock: another run may have started meanwhile
    if overwrite:
        for name in os.listdir(out):
            if name != LOCK_FILE:
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    for parent in (out, os.path.join(out, "checkpoints")):
        for name in clean_leftovers(parent):
            print(f"{parent}: removed {name}, left by an interrupted write")
    resumed = load_newest(out) if resume else None
    if resume and resumed is None:
        print(f"{out}: no checkpoint to resume; starting at step 0")
    if resumed:
        check_resume_settings(resumed[0], resumed[1].get("settings", {}), settings, safe)
    save_config(settings, os.path.join(out, "config.json"))
    return resumed


def check_finite(step: int, out: str, **values: float) -> None:
    """Stop the run when a loss, reward or norm is NaN or inf: nothing after it can be trusted."""
    bad = {name: value for name, value in values.items() if not math.isfinite(value)}
    if bad:
        kept = latest_checkpoint(out) or "none (no checkpoint was written yet)"
        causes = ", ".join(f"{name} is {value}" for name, value in bad.items())
        raise UserError(f"step {step}: {causes}; training stopped before the update. Last good checkpoint: {kept}")
