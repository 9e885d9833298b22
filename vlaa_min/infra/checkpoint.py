"""Crash-safe checkpoint directories and safetensors state-dict files.

* `atomic_directory(final_path)`: write a whole directory or nothing. Files go into a
  temporary sibling directory; on success every file and the directory are fsynced and the
  directory is renamed onto `final_path` (an existing one is moved aside first and deleted
  after the swap, because POSIX cannot rename onto a non-empty directory). If the body
  raises, the temporary directory is deleted and `final_path` is untouched. A crash at any
  point leaves either the old or the new directory complete, plus at most a `*.tmp-*` or
  `*.old-*` sibling to clean up.
* `clean_leftovers(parent)`: after a crash, finish or undo the swaps it interrupted and delete the leftovers
  (only when no other process can be writing into `parent`: the run folder's lock).
* `load_state_dict(directory)`: a single `model.safetensors`, or the shards listed in a
  `model.safetensors.index.json` (the Hugging Face layout).
* `save_state_dict(state_dict, directory, max_shard_bytes=None)`: the same layouts, sharded
  when the tensors exceed `max_shard_bytes` (shards `model-00001-of-00003.safetensors`).

Usage:
    with atomic_directory("runs/step_100") as tmp:
        save_state_dict(model.state_dict(), tmp)
        (tmp / "trainer_state.json").write_text(...)
"""

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: so that renames/creations inside are durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `final_path`; on clean exit it replaces `final_path`."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_path = final_path.with_name(f"{final_path.name}.tmp-{tag}")
    tmp_path.mkdir()
    try:
        yield tmp_path
        _fsync_tree(tmp_path)
    except BaseException:
        shutil.rmtree(tmp_path, ignore_errors=True)
        raise
    old_path = None
    if final_path.exists():
        old_path = final_path.with_name(f"{final_path.name}.old-{tag}")
        os.rename(final_path, old_path)
    os.rename(tmp_path, final_path)
    _fsync_path(final_path.parent)
    if old_path is not None:
        shutil.rmtree(old_path)


def clean_leftovers(parent: str | os.PathLike) -> list[str]:
    """Finish the swaps a crash cut between its two renames, delete every `*.tmp-*` / `*.old-*`; returns their names."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    for old in parent.glob("*.old-*"):
        name, tag = old.name.rsplit(".old-", 1)
        final, tmp = old.with_name(name), old.with_name(f"{name}.tmp-{tag}")
        if not final.exists():  # the new directory was fsynced before the first rename: it is complete
            os.rename(tmp if tmp.exists() else old, final)
    leftovers = sorted([*parent.glob("*.tmp-*"), *parent.glob("*.old-*")])
    for path in leftovers:
        shutil.rmtree(path)
    return [path.name for path in leftovers]


def load_state_dict(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards named by `model.safetensors.index.json`."""
    directory = Path(directory)
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if single.exists():
        return load_file(single, device=str(device))
    if not index.exists():
        raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as error:
        raise ValueError(f"{index}: not a safetensors index (need a 'weight_map' object): {error}") from error
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = directory / shard
        if not shard_path.exists():
            raise FileNotFoundError(f"{index}: lists shard {shard}, which does not exist in {directory}")
        state_dict.update(load_file(shard_path, device=str(device)))
    missing = sorted(set(weight_map) - set(state_dict))
    if missing:
        raise ValueError(f"{index}: {len(missing)} tensor(s) listed but not in any shard, e.g. {missing[:3]}")
    return state_dict


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    """safetensors' save_file, and the mode any other new file gets (0666 less the umask; 0644 for most users):
    save_file writes through a private temporary file, whose mode (0600) the weights would keep."""
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0o022)  # the umask can only be read by setting it: put it back at once
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    directory: str | os.PathLike,
    max_shard_bytes: int | None = None,
) -> list[str]:
    """Write `state_dict` into the existing `directory`; returns the file names written.

    One `model.safetensors` when everything fits in `max_shard_bytes` (or no limit is given),
    else shards of at most `max_shard_bytes` each (a single larger tensor gets a shard of its own)
    plus `model.safetensors.index.json`. Tensors must not share storage (untie them first).
    """
    directory = Path(directory)
    # safetensors needs contiguous, standalone CPU tensors.
    tensors = {name: t.detach().contiguous().cpu() for name, t in state_dict.items()}
    total = sum(_tensor_bytes(t) for t in tensors.values())
    metadata = {"format": "pt"}
    if max_shard_bytes is None or total <= max_shard_bytes:
        _save_file(tensors, directory / SINGLE_FILE, metadata)
        return [SINGLE_FILE]
    if max_shard_bytes <= 0:
        raise ValueError(f"save_state_dict: max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    for name in sorted(tensors):
        size = _tensor_bytes(tensors[name])
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensors[name]
        shard_bytes += size
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for shard_name, shard in zip(names, shards):
        _save_file(shard, directory / shard_name, metadata)
        weight_map.update({tensor_name: shard_name for tensor_name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names + [INDEX_FILE]
