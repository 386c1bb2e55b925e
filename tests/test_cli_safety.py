"""Regressions from a new user's first session with the `hetmerge` command: outputs that destroyed
inputs, NaN weights, a fingerprint that missed a changed file, file modes, half-written sweep folders,
duplicated λ keys, and the checkpoints people actually have (plain nn.Sequential, DataParallel
prefixes, training checkpoints)."""
from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn

import hetmerge as hm
from hetmerge import models
from hetmerge.checkpoint import load_state, save_state
from hetmerge.cli import EXIT_FILE, EXIT_OK, EXIT_USAGE, main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture
def pair(tmp_path):
    """Two random digits-sized MLPs (fc0 has 64 x 32 = 2048 values: more than the old fingerprint's 256)."""
    torch.manual_seed(0)
    b, t = models.mlp(64, [32, 16], 10), models.mlp(64, [24, 20], 10)
    for name, m in (("base", b), ("target", t)):
        save_state(m.state_dict(), tmp_path / f"{name}.safetensors")
        save_state(m.state_dict(), tmp_path / f"{name}.pt")
    return tmp_path


# ---------------------------------------------------------------------------------------------
# 1. an output that is an input is refused (path, symlink, hard link), for every writing command
# ---------------------------------------------------------------------------------------------

def test_merge_output_onto_an_input_is_refused(pair, capsys):
    base, target = pair / "base.safetensors", pair / "target.safetensors"
    before = {p: _digest(p) for p in (base, target)}
    os.symlink(target, pair / "link.safetensors")
    os.link(base, pair / "hard.safetensors")
    for out, victim in ((base, base), (pair / "link.safetensors", target), (pair / "hard.safetensors", base)):
        code, _, err = run(capsys, "merge", base, target, "-o", out)
        assert code == EXIT_FILE, err
        assert str(out) in err and str(victim.name) in err and "overwrite an input" in err
    assert {p: _digest(p) for p in (base, target)} == before


def test_align_and_sweep_outputs_onto_inputs_are_refused(pair, capsys):
    base, target = pair / "base.safetensors", pair / "target.safetensors"
    before = _digest(target)
    code, _, err = run(capsys, "align", base, target, "-o", target)
    assert code == EXIT_FILE and "alignment output" in err and "target weights" in err
    # the sweep folder is replaced as a whole: it may neither be an input nor hold one
    code, _, err = run(capsys, "sweep", base, target, "--data", "digits", "-o", base)
    assert code == EXIT_FILE and "base weights" in err
    code, _, err = run(capsys, "sweep", base, target, "--data", "digits", "-o", pair)
    assert code == EXIT_FILE and "holds the base weights" in err
    assert _digest(target) == before and base.exists()


def test_convert_refuses_its_input_and_existing_files_without_force(pair, capsys):
    src, out = pair / "base.pt", pair / "b.safetensors"
    before = _digest(src)
    code, _, err = run(capsys, "convert", src, src)
    assert code == EXIT_FILE and "overwrite an input" in err and _digest(src) == before
    out.write_bytes(b"precious")
    code, _, err = run(capsys, "convert", src, out)
    assert code == EXIT_FILE and "--force" in err and out.read_bytes() == b"precious"
    assert run(capsys, "convert", src, out, "--force")[0] == EXIT_OK
    a, b = load_state(src), load_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# 2. NaN / inf weights are refused at load time, naming file and tensor
# ---------------------------------------------------------------------------------------------

def test_nonfinite_weights_are_refused_naming_file_and_tensor(pair, capsys):
    base, target = pair / "base.safetensors", pair / "target.safetensors"
    assert run(capsys, "align", base, target, "-o", pair / "al.json")[0] == EXIT_OK
    sd = dict(load_state(target))
    sd["fc1.weight"] = sd["fc1.weight"].clone()
    sd["fc1.weight"][3, 4] = float("nan")
    sd["fc1.weight"][0, 0] = float("inf")
    bad = pair / "bad.safetensors"
    save_state(sd, bad)
    code, _, err = run(capsys, "align", base, bad, "-o", pair / "al2.json")
    assert code == EXIT_FILE and str(bad) in err and "'fc1.weight' (2 values)" in err and "--allow-nonfinite" in err
    for extra in ((), ("--no-stream",)):       # streamed and in-memory merge with a precomputed alignment
        out = pair / "m.safetensors"
        code, _, err = run(capsys, "merge", base, bad, "--alignment", pair / "al.json", "-o", out, *extra)
        assert code == EXIT_FILE and "'fc1.weight'" in err and not out.exists()
    code, _, err = run(capsys, "merge", base, bad, "--alignment", pair / "al.json", "-o", pair / "m.pt",
                       "--allow-nonfinite")
    assert code == EXIT_OK and "kept (--allow-nonfinite)" in err


# ---------------------------------------------------------------------------------------------
# 3. the fingerprint covers every byte; old alignment files are read with a clear message
# ---------------------------------------------------------------------------------------------

def test_fingerprint_sees_a_change_past_the_first_256_values(pair, capsys):
    base, target = pair / "base.safetensors", pair / "target.safetensors"
    assert run(capsys, "align", base, target, "-o", pair / "al.json")[0] == EXIT_OK
    code, _, err = run(capsys, "merge", base, target, "--alignment", pair / "al.json", "-o", pair / "m1.safetensors")
    assert code == EXIT_OK and "differ" not in err
    sd = dict(load_state(target))
    sd["fc0.weight"] = sd["fc0.weight"].clone()
    sd["fc0.weight"][-1, -1] += 1.0          # value 1535 of fc0: the old hash read the first 256 only
    save_state(sd, target)
    code, _, err = run(capsys, "merge", base, target, "--alignment", pair / "al.json", "-o", pair / "m2.safetensors")
    assert code == EXIT_OK and "target weights differ from the file it was computed for" in err
    assert "base weights differ" not in err


def test_old_alignment_files_are_read_with_a_message(pair, capsys):
    base, target = pair / "base.safetensors", pair / "target.safetensors"
    run(capsys, "align", base, target, "-o", pair / "al.json")
    doc = json.loads((pair / "al.json").read_text())
    doc["version"] = 1
    for side in ("base", "target"):     # the version-1 layout
        doc[side].pop("digest"), doc[side].pop("kind")
        doc[side]["weights_sha256"] = "0" * 64
    (pair / "old.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "merge", base, target, "--alignment", pair / "old.json", "-o", pair / "m.safetensors")
    assert code == EXIT_OK and "older hetmerge" in err and "first 256 values" in err


def test_fingerprint_is_format_independent_and_sees_every_byte(pair):
    from hetmerge.checkpoint import scan_weights

    a, b = scan_weights(pair / "base.safetensors"), scan_weights(pair / "base.pt")
    assert a.digest == b.digest and a.nonfinite == [] and a.nbytes == sum(
        v.numel() * v.element_size() for v in load_state(pair / "base.pt").values())
    sd = dict(load_state(pair / "base.pt"))
    last = sorted(sd)[-1]
    sd[last] = sd[last].clone()
    sd[last].view(-1)[-1] = torch.nextafter(sd[last].view(-1)[-1], torch.tensor(1e9))   # one ulp, last value
    save_state(sd, pair / "changed.safetensors")
    assert scan_weights(pair / "changed.safetensors").digest != a.digest


# ---------------------------------------------------------------------------------------------
# 4. file modes follow the umask; an interrupted sweep leaves the whole set or nothing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_honour_the_umask(pair, capsys, umask):
    old = os.umask(umask)
    try:
        out = pair / "m.safetensors"
        assert run(capsys, "merge", pair / "base.safetensors", pair / "target.safetensors", "-o", out)[0] == EXIT_OK
        assert run(capsys, "convert", pair / "base.safetensors", pair / "b.pt")[0] == EXIT_OK
    finally:
        os.umask(old)
    for p in (out, pair / "b.pt"):
        assert (os.stat(p).st_mode & 0o777) == 0o666 & ~umask, oct(os.stat(p).st_mode)


def test_interrupted_sweep_leaves_the_previous_folder_whole(pair, capsys, monkeypatch):
    from hetmerge import report

    base, target = pair / "base.safetensors", pair / "target.safetensors"
    out = pair / "work" / "sw"
    args = ("sweep", base, target, "--data", "digits", "--lambdas", 3, "-o", out)
    real = report.plot_sweeps

    def interrupted(*a, **k):
        real(*a, **k)          # sweep.json and sweep.png are written, report.md is not yet
        raise KeyboardInterrupt
    monkeypatch.setattr(report, "plot_sweeps", interrupted)
    assert run(capsys, *args)[0] == 130
    assert not out.exists() and os.listdir(pair / "work") == []     # nothing, not a partial set
    monkeypatch.setattr(report, "plot_sweeps", real)
    assert run(capsys, *args)[0] == EXIT_OK
    first = {p.name: _digest(p) for p in out.iterdir()}
    assert set(first) >= {"sweep.json", "sweep.png", "report.md"}
    monkeypatch.setattr(report, "plot_sweeps", interrupted)
    assert run(capsys, *args[:-4], "--lambdas", 5, "-o", out)[0] == 130
    assert {p.name: _digest(p) for p in out.iterdir()} == first      # the previous set, untouched
    assert sorted(os.listdir(pair / "work")) == ["sw"]
    (out / "notes.txt").write_text("mine")                            # never deleted by a rerun
    monkeypatch.setattr(report, "plot_sweeps", real)
    code, _, err = run(capsys, *args)
    assert code == EXIT_FILE and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# 6. duplicated λ keys and values are errors naming the duplicate
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, dup", [
    (["--lam", "fc0=0.2", "--lam", "fc0=0.3"], "fc0"),
    (["--lam", "fc0=0.2,fc1=0.1,fc0=0.3"], "fc0"),
    (["--lam", "0.2", "--lam", "0.3"], "0.2,0.3"),
])
def test_duplicated_lam_keys_are_usage_errors(pair, capsys, argv, dup):
    out = pair / "m.safetensors"
    code, _, err = run(capsys, "merge", pair / "base.safetensors", pair / "target.safetensors", "-o", out, *argv)
    assert code == EXIT_USAGE and dup in err and not out.exists()


def test_repeated_lam_flags_add_layers(pair, capsys):
    base, target = pair / "base.safetensors", pair / "target.safetensors"
    out = pair / "m.safetensors"
    code, o, err = run(capsys, "merge", base, target, "-o", out, "--lam", "fc0=0.2", "--lam", "fc1=0.3")
    assert code == EXIT_OK and "fc0=0.2, fc1=0.3" in o


def test_duplicated_lambdas_are_usage_errors(pair, capsys):
    code, _, err = run(capsys, "sweep", pair / "base.safetensors", pair / "target.safetensors", "--data", "digits",
                       "--lambdas", "0,0.5,0.50,1", "-o", pair / "sw")
    assert code == EXIT_USAGE and "[0.5]" in err and not (pair / "sw").exists()


# ---------------------------------------------------------------------------------------------
# 7. plain nn.Sequential checkpoints need no --arch
# ---------------------------------------------------------------------------------------------

def _sequentials():
    torch.manual_seed(0)
    mlp = lambda w: nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Dropout(0.1), nn.Linear(w, 24),  # noqa: E731
                                  nn.BatchNorm1d(24), nn.ReLU(), nn.Linear(24, 10))
    cnn = lambda c: nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),  # noqa: E731
                                  nn.Conv2d(c, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 10))
    out = []
    for kind, make, x in (("mlp", mlp, torch.randn(7, 64)), ("cnn", cnn, torch.randn(7, 1, 8, 8))):
        nets = []
        for w in (32, 32):
            m = make(w)
            for mod in m.modules():      # non-trivial running statistics, so BatchNorm placement matters
                if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                    mod.running_mean.uniform_(-1, 1)
                    mod.running_var.uniform_(0.5, 2)
            nets.append(m.eval())
        out.append((kind, nets, x))
    return out


@pytest.mark.parametrize("kind, nets, x", _sequentials(), ids=["mlp", "cnn"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_plain_sequential_state_dicts_load_without_arch(tmp_path, capsys, kind, nets, x, fmt):
    from hetmerge.cli.models import load_model as _load_model
    from hetmerge.plan import load_plan

    a, b = tmp_path / f"a.{fmt}", tmp_path / f"b.{fmt}"
    for net, p in zip(nets, (a, b)):
        if fmt == "pt":
            torch.save(net.state_dict(), p)
        else:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p))
    code, out, err = run(capsys, "inspect", a, b)
    assert code == EXIT_OK, err
    assert "activations are assumed to be ReLU" in out and "plan OK" in out
    plan = load_plan(overrides={"base_weights": a, "target_weights": b})
    rebuilt, _ = _load_model(plan.base, "base")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), nets[0](x), rtol=0, atol=0)
    # aligning the target onto the base and merging at λ = 1 gives the target's function
    # (permutation invariance), through the CLI end to end
    assert run(capsys, "align", a, b, "-o", tmp_path / "al.json")[0] == EXIT_OK
    assert run(capsys, "merge", a, b, "--alignment", tmp_path / "al.json", "--lam", 1, "-o",
               tmp_path / "m.safetensors")[0] == EXIT_OK
    merged = load_state(tmp_path / "m.safetensors")
    assert set(merged) == set(nets[0].state_dict())
    ref = copy.deepcopy(nets[0])          # the base's own nn.Sequential, merged weights loaded
    ref.load_state_dict(merged)
    with torch.no_grad():
        torch.testing.assert_close(ref.eval()(x), nets[1](x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 8. key prefixes and nested training checkpoints
# ---------------------------------------------------------------------------------------------

def test_training_checkpoints_with_prefixes_load_and_write_plain_state_dicts(pair, capsys):
    sd_b, sd_t = load_state(pair / "base.pt"), load_state(pair / "target.pt")
    wrapped = pair / "train.pt"
    torch.save({"model": {f"module.{k}": v for k, v in sd_t.items()}, "epoch": 7,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, wrapped)
    out = pair / "m.pt"
    code, _, err = run(capsys, "merge", pair / "base.pt", wrapped, "--lam", 0, "-o", out)
    assert code == EXIT_OK, err
    got = load_state(out)
    assert list(got) == list(sd_b) and all(torch.equal(got[k], sd_b[k]) for k in sd_b)   # λ = 0: the base
    # two state dicts: ambiguous unless --sub-key picks one
    two = pair / "two.pt"
    torch.save({"model": dict(sd_t), "model_ema": {k: v + 1 for k, v in sd_t.items()}}, two)
    code, _, err = run(capsys, "convert", two, pair / "c.safetensors")
    assert code == EXIT_FILE and "['model', 'model_ema']" in err and "--sub-key" in err
    assert run(capsys, "convert", two, pair / "c.safetensors", "--sub-key", "model_ema")[0] == EXIT_OK
    c = load_state(pair / "c.safetensors")
    assert all(torch.equal(c[k], sd_t[k] + 1) for k in sd_t)
    code, _, err = run(capsys, "convert", wrapped, pair / "d.safetensors", "--key-prefix", "net.")
    assert code == EXIT_FILE and "key_prefix 'net.'" in err and "module.fc0.weight" in err
    # safetensors with a DataParallel prefix streams into a plain state dict
    dp = pair / "dp.safetensors"
    save_state({f"module.{k}": v for k, v in sd_t.items()}, dp)
    code, o, err = run(capsys, "merge", pair / "base.safetensors", dp, "--lam", 0.5, "-o", pair / "s.safetensors")
    assert code == EXIT_OK and "streamed" in o, err
    assert list(load_state(pair / "s.safetensors")) == list(load_state(pair / "base.safetensors"))


def test_auto_prefix_rule_is_named_when_the_model_wants_the_prefix(tmp_path, capsys, monkeypatch):
    # a factory whose own keys start with "model.": the automatic rule strips it, the error says how to keep it
    (tmp_path / "wrapped_net.py").write_text(
        "import torch.nn as nn\nclass W(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))\n"
        "    def forward(self, x):\n        return self.model(x)\ndef make():\n    return W()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    import importlib
    m = importlib.import_module("wrapped_net").make()
    save_state(m.state_dict(), tmp_path / "w.safetensors")
    args = ("inspect", tmp_path / "w.safetensors", tmp_path / "w.safetensors", "--arch", "wrapped_net:make")
    code, _, err = run(capsys, *args)
    assert code == 4 and "--key-prefix ''" in err and "'model.0.weight' -> '0.weight'" in err
    assert run(capsys, *args, "--key-prefix", "")[0] == EXIT_OK
