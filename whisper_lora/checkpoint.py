"""Resumable training state: adapter weights, optimizer, scheduler, RNG and loop counters.

A checkpoint is written to a `.partial` folder and renamed when complete, so a run killed while
saving (SIGKILL, spot reclaim) resumes from the previous complete checkpoint.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    best_metric: float | None = None
    best_step: int | None = None
    samples_seen: int = 0
    num_processes: int = 1  # data order per rank depends on it: resuming with another count is refused
    streams: list[dict] = field(default_factory=list)  # per rank, streaming: {"epoch", "consumed": {worker: n}}
    ids_logged: list[int] = field(default_factory=list)  # per rank: lines of the --sample-log at this checkpoint
    history: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_partial(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is written before it is complete."""
    return run_dir / CHECKPOINT_DIR / f"step-{step:07d}.partial"


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """An empty `.partial` folder for the checkpoint of `step`."""
    partial = checkpoint_partial(run_dir, step)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def finish_checkpoint(run_dir: Path, partial: Path, state: TrainState, keep: int) -> Path:
    """Write the loop's state and make the checkpoint final; keep the last `keep`."""
    (partial / "state.json").write_text(json.dumps(asdict(state), ensure_ascii=False))
    final = partial.with_name(partial.name.removesuffix(".partial"))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: Path, peft_model, optimizer, scheduler, state: TrainState, keep: int,
                    scaler=None) -> Path:
    from safetensors.torch import save_file

    from .lora import trainable_state

    partial = begin_checkpoint(run_dir, state.step)
    weights = {k: v.detach().cpu().contiguous() for k, v in trainable_state(peft_model).items()}
    save_file(weights, partial / "adapter.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                "scaler": scaler.state_dict() if scaler is not None else None}, partial / "trainer.pt")
    return finish_checkpoint(run_dir, partial, state, keep)


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, peft_model, optimizer, scheduler, scaler=None) -> TrainState:
    from safetensors.torch import load_file

    from .lora import load_trainable_state

    load_trainable_state(peft_model, load_file(path / "adapter.safetensors"))
    trainer = torch.load(path / "trainer.pt", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"])
    if scaler is not None and trainer.get("scaler"):
        scaler.load_state_dict(trainer["scaler"])
    return read_state(path)


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / "state.json").read_text()))
