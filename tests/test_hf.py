"""Hugging Face directories: lazy sharded reading, streamed atomic writing (tiny random models, no download)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from hetmerge.hf import INDEX_NAME, WEIGHTS_NAME, HFError, HFState, parse_size, read_config, save_hf
from hf_models import build, outputs


FAMILIES = ["llama", "gpt2", "bert", "vit"]


def _save(model, path, **kw):
    model.save_pretrained(path, **kw)
    return path


def _reference(folder) -> dict:
    """Every tensor of a directory, read by the safetensors package itself."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _untied(model, dtype=None) -> dict:
    """The model's state dict without the tied LM-head alias (which save_pretrained leaves out)."""
    sd = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" in sd
    return {k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()
            if not (tied and k == "lm_head.weight")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["single", "sharded", "bf16"])
def test_read_equals_state_dict(tmp_path, family, layout):
    model, _ = build(family)
    kw = {"max_shard_size": "20KB"} if layout == "sharded" else {}
    if layout == "bf16":
        model = model.to(torch.bfloat16)
    d = _save(model, tmp_path / "m", **kw)
    assert (d / INDEX_NAME).is_file() == (layout == "sharded")
    st = HFState(d)
    if layout == "sharded":
        assert len(st.shards) > 1
    ref = _reference(d)
    assert set(st) == set(ref)
    if family != "vit":   # transformers 5 stores ViT under its 4.x key names
        assert set(ref) == set(_untied(model))
    for k, v in ref.items():
        t = st[k]
        assert t.dtype == v.dtype and t.shape == v.shape, k
        assert torch.equal(t, v), k
    assert st.config["model_type"] == model.config.model_type
    assert {k: tuple(m.shape) for k, m in st.meta().items()} == {k: tuple(v.shape) for k, v in ref.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_written_directory_loads_with_from_pretrained(tmp_path, family):
    model, inputs = build(family)
    src = _save(model, tmp_path / "src")
    (src / "tokenizer_config.json").write_text('{"model_max_length": 7}\n')
    out = save_hf(tmp_path / "out", HFState(src), base_dir=src, max_shard_size="16KB")
    assert (out / INDEX_NAME).is_file() and not (out / WEIGHTS_NAME).exists()
    index = json.loads((out / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    for shard in set(index["weight_map"].values()):
        assert (out / shard).stat().st_size <= 16_000 + 4096 or len(
            [k for k, s in index["weight_map"].items() if s == shard]) == 1
    assert (out / "tokenizer_config.json").read_bytes() == (src / "tokenizer_config.json").read_bytes()
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    back = type(model).from_pretrained(out).eval()
    assert torch.equal(outputs(back, inputs), outputs(model, inputs))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert out.stat().st_mode & 0o777 == src.stat().st_mode & 0o777    # not mkdtemp's 0700


def test_written_single_file_and_dtype(tmp_path):
    model, inputs = build("llama")
    src = _save(model, tmp_path / "src")
    out = save_hf(tmp_path / "out", HFState(src), base_dir=src, dtype=torch.bfloat16)
    assert (out / WEIGHTS_NAME).is_file() and not (out / INDEX_NAME).exists()
    st = HFState(out)
    for k, v in _untied(model, torch.bfloat16).items():
        assert st[k].dtype == torch.bfloat16 and torch.equal(st[k], v), k
    assert read_config(out)["dtype"] == "bfloat16"
    back = type(model).from_pretrained(out).eval()
    ref = type(model).from_pretrained(src, dtype=torch.bfloat16).eval()
    assert torch.equal(outputs(back, inputs), outputs(ref, inputs))


class _Interrupted(dict):
    """A lazy state that is interrupted (Ctrl-C) when the writer asks for its n-th tensor."""

    def __init__(self, src, n):
        super().__init__(src)
        self.n = n
        self.asked = 0

    def __getitem__(self, key):
        self.asked += 1
        if self.asked == self.n:
            raise KeyboardInterrupt
        return super().__getitem__(key)


def test_interrupted_write_leaves_nothing(tmp_path):
    model, _ = build("gpt2")
    src = _save(model, tmp_path / "src")
    work = tmp_path / "work"
    work.mkdir()
    state = HFState(src)
    with pytest.raises(KeyboardInterrupt):
        save_hf(work / "out", _Interrupted(state, 6), base_dir=src, max_shard_size="16KB")
    assert list(work.iterdir()) == []
    # replacing an existing directory: interrupted, the old one is left whole
    save_hf(work / "out", state, base_dir=src)
    before = {p.name: p.read_bytes() for p in (work / "out").iterdir()}
    with pytest.raises(KeyboardInterrupt):
        save_hf(work / "out", _Interrupted(state, 3), base_dir=src, overwrite=True)
    assert [p.name for p in work.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in (work / "out").iterdir()} == before


def test_overwrite_replaces_and_existing_is_refused(tmp_path):
    model, _ = build("bert")
    src = _save(model, tmp_path / "src")
    save_hf(tmp_path / "out", HFState(src), base_dir=src, max_shard_size="16KB")
    with pytest.raises(HFError, match="already exists"):
        save_hf(tmp_path / "out", HFState(src), base_dir=src)
    save_hf(tmp_path / "out", HFState(src), base_dir=src, overwrite=True)
    assert (tmp_path / "out" / WEIGHTS_NAME).is_file() and not (tmp_path / "out" / INDEX_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_bad_directories_name_the_problem(tmp_path):
    model, _ = build("gpt2")
    d = _save(model, tmp_path / "m", max_shard_size="20KB")
    index = json.loads((d / INDEX_NAME).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    os.rename(d / shard, tmp_path / "moved")
    with pytest.raises(HFError, match=shard):
        HFState(d)
    os.rename(tmp_path / "moved", d / shard)
    key = next(iter(index["weight_map"]))
    index["weight_map"]["extra.weight"] = index["weight_map"][key]
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(HFError, match="extra.weight"):
        HFState(d)
    index["weight_map"] = {k: "../x.safetensors" for k in index["weight_map"]}
    (d / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(HFError, match="not a file name inside"):
        HFState(d)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFError, match="config.json"):
        HFState(empty)
    (empty / "config.json").write_text("{}")
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(HFError, match="pytorch_model.bin"):
        HFState(empty)
    with pytest.raises(HFError, match="not a directory"):
        HFState(tmp_path / "nowhere")
    with pytest.raises(HFError, match="base_dir"):
        save_hf(tmp_path / "x", {"w": torch.zeros(2)})
    with pytest.raises(HFError, match="parent folder"):
        save_hf(tmp_path / "no" / "x", {"w": torch.zeros(2)}, config={})


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("200MiB") == 200 * 2**20
    assert parse_size("20KB") == 20_000
    assert parse_size(123) == 123
    for bad in ("", "5XB", -1, 0, "GB", 1.5, True):
        with pytest.raises(HFError, match="max_shard_size"):
            parse_size(bad)


class _Counting(dict):
    """A lazy state that builds each tensor on request and records how many are alive at once."""

    def __init__(self, shapes):
        super().__init__({k: torch.empty(s, device="meta") for k, s in shapes.items()})
        self.alive, self.peak, self.order = 0, 0, []

    def meta(self):
        return dict(self.items())

    def __getitem__(self, key):
        import weakref

        t = torch.full(super().__getitem__(key).shape, float(len(self.order)))
        self.order.append(key)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(t, self._dead)
        return t

    def _dead(self):
        self.alive -= 1


def test_save_hf_streams_one_tensor_at_a_time(tmp_path):
    shapes = {f"layer{i}.weight": (64, 32) for i in range(12)}
    state = _Counting(shapes)
    out = save_hf(tmp_path / "out", state, config={"model_type": "none"}, max_shard_size="20KB")
    assert state.order == list(shapes) and state.peak == 1
    st = HFState(out)
    assert len(st.shards) == 6
    for i, k in enumerate(shapes):
        assert torch.equal(st[k], torch.full((64, 32), float(i))), k
