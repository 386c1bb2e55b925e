"""Shared by test_fleet.py and test_cli_zoo.py: a small zoo of digits MLPs on disk, and tasks that
misbehave on purpose (importable by worker processes; Ray gets this module by value)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

# name -> hidden widths: same size, narrower, deeper and tapered (size-incompatible) pairs
ZOO = {"a32": [32, 32], "b48": [48, 48], "c32x3": [32, 32, 32], "d48-16": [48, 16]}


def make_zoo(folder: Path, epochs: int = 3, cnn: bool = False) -> Path:
    """Digits MLPs trained briefly (seeded) on the training part hetmerge.zoo holds validation out
    of, saved as safetensors; cnn=True adds a small conv net (no layer in common with the MLPs)."""
    from hetmerge import models
    from hetmerge.checkpoint import save_state
    from hetmerge.zoo import load_data

    folder.mkdir(parents=True, exist_ok=True)
    s = load_data("digits")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for seed, (name, widths) in enumerate(ZOO.items()):
            torch.manual_seed(seed)
            m = models.mlp(64, widths, 10)
            models.train(m, s.X_train, s.y_train, epochs=epochs, lr=3e-3, batch_size=128, seed=seed)
            save_state(m.state_dict(), folder / f"{name}.safetensors")
        if cnn:
            torch.manual_seed(9)
            m = models.cnn(1, [4], 10, (8, 8), bn=False)
            save_state(m.state_dict(), folder / "e_cnn.safetensors")
    finally:
        torch.set_num_threads(threads)
    return folder


def square(x: int) -> dict:
    return {"x": x, "square": x * x, "pid": os.getpid()}


def raises(x: int) -> dict:
    raise ValueError(f"task {x} always fails")


def dies(x: int, marker: str | None = None) -> dict:
    """Kill the worker process (no exception, no cleanup); with `marker`, only the first time."""
    if marker is None or not os.path.exists(marker):
        if marker is not None:
            Path(marker).touch()
        os._exit(13)
    return {"x": x, "survived": True, "pid": os.getpid()}


def threads() -> dict:
    import hetmerge
    return {"torch": torch.get_num_threads(), "hetmerge": hetmerge.get_num_threads()}


def not_a_dict() -> list:
    return [1, 2]
