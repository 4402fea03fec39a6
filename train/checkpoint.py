"""Training checkpoints that a kill at any moment cannot break, and the RNG states they carry.

A checkpoint is a folder `OUTPUT/checkpoints/checkpoint-00000100/`:

    <name>.safetensors   one per module or tensor group (model, text encoder, EMA, discriminator)
    state.pt             step, optimizer and LR schedule states, data position, RNG states, config
    checkpoint.json      written last: the step and every file's size (the completeness marker)

It is written into a hidden temporary folder, every file and the folder are fsync'ed, and only
then is the folder renamed into place with os.replace (atomic on POSIX), so the checkpoints
folder only ever holds complete checkpoints and stale temporaries. Resolution of `latest`
still checks the marker and the sizes, so a checkpoint truncated by other means is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"  # subfolder of the run's output folder
PREFIX = "checkpoint-"
MARKER = "checkpoint.json"
STATE = "state.pt"
TMP_PREFIX = ".tmp-"


def checkpoints_root(output: str | os.PathLike) -> Path:
    """Where a run writing to `output` keeps its checkpoints."""
    return Path(output) / CHECKPOINTS


# ---- writing ----


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
    for name, group in tensors.items():
        group = {k: v.detach().contiguous().cpu() for k, v in group.items()}
        save_file(group, str(folder / f"{name}.safetensors"))
        _fsync(folder / f"{name}.safetensors")
    torch.save(state, folder / STATE)
    _fsync(folder / STATE)


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    total_limit: int | None = None,
) -> Path:
    """Write checkpoint `step` atomically under root, then keep only the newest `total_limit`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_files(tmp, tensors, state)
    files = {p.name: p.stat().st_size for p in tmp.iterdir()}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=2) + "\n")
    _fsync(tmp / MARKER)
    _fsync(tmp)
    if final.exists():  # the same step written again (a resumed run): swap the old one out
        old = root / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    _fsync(root)
    prune(root, total_limit)
    return final


def prune(root: Path, total_limit: int | None) -> None:
    """Delete stale temporaries, and the oldest checkpoints beyond `total_limit`."""
    for stale in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    if total_limit is None:
        return
    if total_limit < 1:
        raise ValueError(f"total_limit={total_limit} must be >= 1 (or None: keep all)")
    for old in list_checkpoints(root)[:-total_limit]:
        logger.info("removing old checkpoint %s (--checkpoints-total-limit %d)", old, total_limit)
        doomed = root / f"{TMP_PREFIX}del-{old.name}"  # renamed first: no half-deleted checkpoint
        os.replace(old, doomed)
        shutil.rmtree(doomed)


# ---- finding and reading ----


def is_complete(folder: Path) -> bool:
    """Whether `folder` holds a marker and every file it lists, at the listed size."""
    try:
        marker = json.loads((folder / MARKER).read_text())
        return all((folder / name).stat().st_size == size for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir()]
    complete = [p for p in found if is_complete(p)]
    for p in sorted(set(found) - set(complete)):
        logger.warning("skipping incomplete checkpoint %s", p)
    return sorted(complete, key=lambda p: p.name)


def resolve_resume(output: str | os.PathLike, resume: str) -> Path | None:
    """`--resume latest` (None when there is no checkpoint yet) or an explicit checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(checkpoints_root(output))
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"--resume: {path} is not a folder; give 'latest' or a "
            f"checkpoint folder ({PREFIX}NNNNNNNN)"
        )
    if is_complete(path):
        return path
    # a run's output folder or its checkpoints folder: take its newest checkpoint
    for root in (path, checkpoints_root(path)):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise ValueError(
        f"--resume: {path} is not a complete checkpoint and holds none "
        f"(a checkpoint folder has {MARKER} written last)"
    )


def load_checkpoint(folder: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensor groups by name, state) of a checkpoint; nothing is unpickled beyond plain data."""
    if not is_complete(folder):
        raise ValueError(f"checkpoint {folder} is incomplete or damaged")
    tensors = {p.stem: load_file(p) for p in sorted(folder.glob("*.safetensors"))}
    state = torch.load(folder / STATE, map_location="cpu", weights_only=True)
    return tensors, state


def step_of(folder: Path) -> int:
    """The step a checkpoint folder was written at."""
    return int(json.loads((folder / MARKER).read_text())["step"])


# ---- a run's checkpoint, across processes ----


def write_checkpoint(
    accelerator: Accelerator,
    output: str | os.PathLike,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict,
    generator: torch.Generator,
    total_limit: int | None = None,
) -> Path | None:
    """Save a run's checkpoint (main process) with every process's RNG states; its folder."""
    from accelerate.utils import gather_object

    rngs = gather_object([rng_state(generator)])  # collective: every process must call this
    path = None
    if accelerator.is_main_process:
        state = {
            **state,
            "step": step,
            "rng": rngs,
            "num_processes": accelerator.num_processes,
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler else None,
        }
        path = save_checkpoint(checkpoints_root(output), step, tensors, state, total_limit)
        logger.info("saved checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path


def read_checkpoint(
    accelerator: Accelerator,
    output: str | os.PathLike,
    resume: str | None,
    generator: torch.Generator,
    config: dict,
) -> tuple[dict, dict] | None:
    """Load the checkpoint `resume` names (None: start fresh) and restore this process's RNGs."""
    if resume is None:
        return None
    path = resolve_resume(output, resume)
    if path is None:
        logger.warning(
            "--resume latest: no checkpoint in %s yet; starting from scratch",
            checkpoints_root(output),
        )
        return None
    tensors, state = load_checkpoint(path)
    _warn_if_not_exact(state, config, accelerator.num_processes)
    rngs = state["rng"]
    if len(rngs) == accelerator.num_processes:
        set_rng_state(rngs[accelerator.process_index], generator)
    if accelerator.scaler is not None and state.get("scaler"):
        accelerator.scaler.load_state_dict(state["scaler"])
    logger.info("resuming from %s (step %d)", path, state["step"])
    return tensors, state


def _warn_if_not_exact(state: dict, config: dict, num_processes: int) -> None:
    saved, now = state.get("config", {}), config
    keys = (("run", "batch_size"), ("run", "gradient_accumulation_steps"), ("run", "seed"),
            ("data", "data"))  # fmt: skip
    changed = [f"{a}.{b}" for a, b in keys if saved.get(a, {}).get(b) != now.get(a, {}).get(b)]
    if state["num_processes"] != num_processes:
        changed.append(f"num_processes ({state['num_processes']} -> {num_processes})")
    if changed:
        logger.warning(
            "resuming with changed %s: the run continues, but not exactly as the "
            "uninterrupted run would have",
            ", ".join(changed),
        )


# ---- random number generator states ----


def rng_state(generator: torch.Generator | None = None) -> dict:
    """This process's RNG states: python, numpy, torch (CPU and CUDA) and the training generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
