"""Checkpoint I/O: both formats round-trip, malicious pickles are refused without running, writes are
atomic, and the streaming merge equals the in-memory formula."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from hetmerge import ops
from hetmerge.merging import MergeItem, stream_merge
from hetmerge.checkpoint import (CheckpointError, LazyState, StreamWriter, UnsafeCheckpointError, atomic_write,
                                 detect_format, load_state, save_state)


def _state(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return {"fc0.weight": torch.randn(6, 4, generator=g).to(dtype), "fc0.bias": torch.randn(6, generator=g).to(dtype),
            "bn.num_batches_tracked": torch.tensor(3), "head.weight": torch.randn(3, 6, generator=g).to(dtype)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_round_trip(tmp_path, suffix, dtype):
    sd = _state(dtype)
    p = save_state(sd, tmp_path / f"m{suffix}")
    assert detect_format(p) == ("safetensors" if suffix == ".safetensors" else "torch")
    back = load_state(p)
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k])


def test_safetensors_files_are_readable_by_the_reference_library(tmp_path):
    from safetensors.torch import load_file, save_file

    sd = _state(torch.bfloat16)
    save_state(sd, tmp_path / "ours.safetensors")
    theirs = load_file(tmp_path / "ours.safetensors")
    assert all(torch.equal(theirs[k], sd[k]) for k in sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "ref.safetensors")
    ours = load_state(tmp_path / "ref.safetensors")
    assert all(torch.equal(ours[k], sd[k]) for k in sd)


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, how):
    marker = tmp_path / "payload_ran"
    p = tmp_path / "evil.pt"
    obj = {"w": torch.ones(2), "x": _Payload(marker)}
    if how == "torch.save":
        torch.save(obj, p)
    else:
        with open(p, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        load_state(p)
    assert not marker.exists()


def test_not_a_state_dict_and_garbage(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state(tmp_path / "list.pt")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a safetensors or PyTorch"):
        load_state(tmp_path / "junk.bin")
    with pytest.raises(CheckpointError, match="no such file"):
        load_state(tmp_path / "missing.safetensors")


def test_truncated_safetensors_is_detected(tmp_path):
    p = save_state(_state(), tmp_path / "m.safetensors")
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state(tmp_path / "cut.safetensors")


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    p = tmp_path / "out.safetensors"
    save_state({"a": torch.ones(3)}, p)
    before = p.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with StreamWriter(p, [("a", torch.float32, (3,)), ("b", torch.float32, (2,))]) as w:
            w.write("a", torch.zeros(3))
            raise KeyboardInterrupt
    assert p.read_bytes() == before                       # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]   # no temporary left over
    with pytest.raises(CheckpointError, match="never written"):
        with StreamWriter(tmp_path / "new.safetensors", [("a", torch.float32, (3,))]):
            pass
    assert not (tmp_path / "new.safetensors").exists()
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "x.bin") as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert not (tmp_path / "x.bin").exists()


def test_lazy_rows_and_gather(tmp_path):
    t = torch.arange(40, dtype=torch.float32).view(10, 4)
    save_state({"t": t, "bf": t.to(torch.bfloat16)}, tmp_path / "m.safetensors")
    lz = LazyState(tmp_path / "m.safetensors")
    assert torch.equal(lz.get_rows("t", 3, 7), t[3:7])
    idx = torch.tensor([9, 2, 3, 4, 0])
    assert torch.equal(lz.gather_rows("t", idx), t[idx])
    assert torch.equal(lz.gather_rows("bf", idx), t[idx].to(torch.bfloat16))
    assert lz.meta()["t"].device.type == "meta"


def _rand_map(n_a, n_b, rng):
    src = np.full(n_a, -1, dtype=np.int64)
    n = min(n_a, n_b)
    src[rng.choice(n_a, n, replace=False)] = rng.choice(n_b, n, replace=False)
    return torch.from_numpy(src)


@pytest.mark.parametrize("chunk_bytes", [64, 1 << 20])
def test_stream_merge_matches_formula(tmp_path, chunk_bytes):
    rng = np.random.default_rng(0)
    g = torch.Generator().manual_seed(1)
    a = {"fc0.weight": torch.randn(12, 5, generator=g), "fc0.bias": torch.randn(12, generator=g),
         "head.weight": torch.randn(3, 12, generator=g), "steps": torch.tensor(7)}
    b = {"fc0.weight": torch.randn(8, 5, generator=g), "fc0.bias": torch.randn(8, generator=g),
         "head.weight": torch.randn(3, 8, generator=g)}
    save_state(a, tmp_path / "a.safetensors")
    save_state(b, tmp_path / "b.safetensors")
    m = _rand_map(12, 8, rng)
    items = {"fc0.weight": ("fc0.weight", m, None, 0.3), "fc0.bias": ("fc0.bias", m, None, 0.3),
             "head.weight": ("head.weight", None, m, 0.6)}
    stream_merge(LazyState(tmp_path / "a.safetensors"), LazyState(tmp_path / "b.safetensors"),
                 tmp_path / "m.safetensors", [MergeItem(k, tk, k.split(".")[0], r, c, lam)
                                              for k, (tk, r, c, lam) in items.items()],
                 fill="base", chunk_bytes=chunk_bytes)
    out = load_state(tmp_path / "m.safetensors")
    for k, (tk, rows, cols, lam) in items.items():
        want = ops.interpolate(a[k], b[tk], [lam], rows, cols, fill="base")[0]
        torch.testing.assert_close(out[k], want)
    assert torch.equal(out["steps"], a["steps"])


# ---------------------------------------------------------------------------------------------
# regressions from the CLI hardening issue
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_scan_counts_nonfinite_values_across_chunk_edges(monkeypatch, dtype):
    from hetmerge.checkpoint import scan as checkpoint   # where the chunk size lives
    from hetmerge.checkpoint import scan_state

    monkeypatch.setattr(checkpoint, "_SCAN_CHUNK", 64)     # many chunks, bad values on their edges
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, 11, generator=g).to(dtype)
    flat = w.view(-1)
    for i, v in ((0, float("nan")), (15, float("inf")), (16, -float("inf")), (flat.numel() - 1, float("nan"))):
        flat[i] = v
    sd = {"a.weight": w, "b.bias": torch.randn(5, generator=g).to(dtype), "n": torch.tensor(3)}
    scan = scan_state(sd)
    assert scan.nonfinite == [("a.weight", int((~torch.isfinite(w)).sum()))] == [("a.weight", 4)]
    assert scan.nbytes == sum(v.numel() * v.element_size() for v in sd.values())
    # the digest covers every byte and does not depend on the chunk size or the dict's order
    monkeypatch.setattr(checkpoint, "_SCAN_CHUNK", 8 << 20)
    assert scan_state(dict(reversed(list(sd.items())))).digest == scan.digest
    w2 = w.clone()
    w2.view(-1)[200] = 0.5 if float(w2.view(-1)[200]) != 0.5 else 0.25
    assert scan_state({**sd, "a.weight": w2}).digest != scan.digest


def test_training_checkpoint_selection_and_prefixes(tmp_path):
    from hetmerge.checkpoint import select_state, strip_prefix

    sd = {"0.weight": torch.ones(2, 2), "0.bias": torch.zeros(2)}
    p = tmp_path / "x.pt"
    assert select_state(sd, p) is sd
    assert select_state({"state_dict": sd, "epoch": 3, "hparams": {"lr": 0.1}}, p) is sd
    assert select_state({"ckpt": {"ema": sd}}, p, "ckpt.ema") is sd
    with pytest.raises(CheckpointError, match=r"several state dicts \['model', 'ema'\]"):
        select_state({"model": sd, "ema": sd}, p)
    with pytest.raises(CheckpointError, match=r"sub_key 'ckpt.model': no entry 'model' \(entries: \['ema'\]\)"):
        select_state({"ckpt": {"ema": sd}}, p, "ckpt.model")
    keys = ["module.model.fc.weight", "module.model.fc.bias"]
    assert strip_prefix(keys, p) == {k: k[len("module.model."):] for k in keys}     # auto, repeatedly
    assert strip_prefix(keys, p, "") == {k: k for k in keys}
    assert strip_prefix(keys, p, "module.") == {k: k[len("module."):] for k in keys}
    assert strip_prefix(["module.a", "b"], p) == {"module.a": "module.a", "b": "b"}   # not shared: kept
    with pytest.raises(CheckpointError, match="key_prefix 'x.'"):
        strip_prefix(keys, p, "x.")
    save_state({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.safetensors")
    assert list(load_state(tmp_path / "dp.safetensors")) == ["0.weight", "0.bias"]
    assert list(LazyState(tmp_path / "dp.safetensors", key_prefix="")) == ["module.0.weight", "module.0.bias"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_write_gives_umask_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f.bin") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "f.bin").st_mode & 0o777 == 0o666 & ~umask


def test_atomic_dir_replaces_whole_or_refuses(tmp_path):
    from hetmerge.checkpoint import atomic_dir

    out = tmp_path / "d"
    with atomic_dir(out, {"a", "b"}) as t:
        (t / "a").write_text("1")
        (t / "b").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, {"a", "b"}) as t:
            (t / "a").write_text("2")
            raise RuntimeError("interrupted")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "1", "b": "1"}
    with atomic_dir(out, {"a", "b"}) as t:
        (t / "a").write_text("3")
    assert {p.name: p.read_text() for p in out.iterdir()} == {"a": "3"}
    assert sorted(os.listdir(tmp_path)) == ["d"]                   # no temporary folders left behind
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="mine.txt"):
        with atomic_dir(out, {"a", "b"}):
            pass
    assert (out / "mine.txt").read_text() == "keep"
