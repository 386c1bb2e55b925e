"""Plan files and options: every key validated up front with a message naming it; flags and plan
keys come from one dataclass."""
from __future__ import annotations

import argparse
import json

import pytest

from hetmerge.architectures import ArchError, build, parse_arch
from hetmerge.plan import (Options, PlanError, add_option_flags, load_plan, options_from_args, parse_layer_map,
                           read_plan_file)


@pytest.fixture
def files(tmp_path):
    for n in ("a.safetensors", "b.pt"):
        (tmp_path / n).write_bytes(b"x")
    return tmp_path


def _plan(tmp_path, text, suffix=".yaml"):
    p = tmp_path / f"plan{suffix}"
    p.write_text(text)
    return p


def test_yaml_plan_with_relative_weights_and_options(files):
    p = _plan(files, """
base: {arch: mlp, weights: a.safetensors}
target: {arch: {type: mlp, widths: [32, 96]}, weights: b.pt}
layer_map: {fc0: fc0, fc1: fc1}
lam: {fc0: 0.5, fc1: 0.2}
restarts: 3
lambdas: [0, 0.5, 1]
""")
    plan = load_plan(path=p)
    assert plan.base.weights == files / "a.safetensors"
    assert plan.target.arch.params["widths"] == [32, 96]
    assert plan.options.restarts == 3 and plan.options.lam == {"fc0": 0.5, "fc1": 0.2}
    assert plan.options.lambdas == [0.0, 0.5, 1.0]
    assert plan.layer_map == {"fc0": "fc0", "fc1": "fc1"}


def test_json_plan_and_flag_overrides(files):
    p = _plan(files, json.dumps({"base": "a.safetensors", "target": "b.pt", "lam": 0.1}), ".json")
    plan = load_plan(path=p, overrides={"lam": "0.7", "max_iter": "5", "layer_map": "fc0=fc0"})
    assert plan.options.lam == 0.7 and plan.options.max_iter == 5 and plan.layer_map == {"fc0": "fc0"}


@pytest.mark.parametrize("text, match", [
    ("restrats: 3", r"unknown key\(s\) 'restrats' \(did you mean 'restarts'\?\)"),
    ("lam: 1.5", r"^lam: expected a number in \[0.0, 1.0\], got 1.5"),
    ("lam: {fc0: abc}", r"lam: layer 'fc0': expected a number"),
    ("method: magic", r"method: expected one of \['weight', 'activation'\]"),
    ("max_iter: -1", r"max_iter: expected an integer >= 0"),
    ("method: activation", r"method: 'activation' needs data"),
    ("base: {arch: mlp, weights: a.safetensors, wieghts: 1}", r"base: unknown key\(s\) 'wieghts'"),
    ("base: {arch: {type: resnet}, weights: a.safetensors}", r"base.arch.type: expected 'mlp' or 'cnn'"),
    ("base: {arch: {type: mlp, widths: [3, -1]}, weights: a.safetensors}", r"base.arch.widths: expected a list"),
    ("layer_map: {fc0: x, fc1: x}", r"layer_map: target layer\(s\) \['x'\] are paired with more than one"),
    ("- just\n- a list", r"expected a mapping at the top level"),
    ("lam: [1, 2", r"invalid YAML"),
])
def test_bad_plans_name_the_key(files, text, match):
    base = "base: a.safetensors\ntarget: b.pt\n" if not text.startswith(("base:", "-", "lam: [")) else ""
    if text.startswith("base:"):
        base = "target: b.pt\n"
    p = _plan(files, base + text)
    with pytest.raises(PlanError, match=match):
        load_plan(path=p)


def test_missing_weights(files):
    with pytest.raises(PlanError, match="target.weights: missing"):
        load_plan(path=_plan(files, "base: a.safetensors"))
    with pytest.raises(FileNotFoundError, match="target.weights: .*nope.pt: no such file"):
        load_plan(path=_plan(files, "base: a.safetensors\ntarget: nope.pt"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_plan_file(files / "absent.yaml")


def test_flags_are_generated_from_options():
    p = argparse.ArgumentParser()
    add_option_flags(p)
    args = p.parse_args(["--max-iter", "7", "--lam", "fc0=0.5,fc1=0.25"])
    raw = options_from_args(args)
    assert raw == {"max_iter": "7", "lam": "fc0=0.5,fc1=0.25"}
    help_text = p.format_help()
    for name in Options.names():
        assert "--" + name.replace("_", "-") in help_text
    assert "{weight,activation}" in help_text


def test_layer_map_forms():
    assert parse_layer_map("fc0=fc0, fc1=2") == {"fc0": "fc0", "fc1": "2"}
    assert parse_layer_map([["fc0", "fc1"]]) == {"fc0": "fc1"}
    with pytest.raises(PlanError, match="base=target pairs"):
        parse_layer_map("fc0")


def test_architectures_infer_sizes_and_factories(tmp_path, monkeypatch):
    import torch
    from hetmerge import models

    m = models.mlp(64, [32, 16], 10)
    model, ex = build(parse_arch("mlp"), m.state_dict())
    assert [l.out_features for l in model if isinstance(l, torch.nn.Linear)] == [32, 16, 10]
    assert ex.shape == (2, 64)
    (tmp_path / "user_models.py").write_text(
        "import torch.nn as nn\ndef make(width=8):\n    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), "
        "nn.Linear(width, 2))\ndef not_a_model():\n    return 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, _ = build(parse_arch({"factory": "user_models:make", "kwargs": {"width": 5}}))
    assert model[0].out_features == 5
    with pytest.raises(ArchError, match="returned a int"):
        build(parse_arch("user_models:not_a_model"))
    with pytest.raises(ArchError, match="cannot import module 'no_such_mod'"):
        build(parse_arch("no_such_mod:f"))
    with pytest.raises(ArchError, match="rejected kwargs"):
        build(parse_arch({"factory": "user_models:make", "kwargs": {"depth": 2}}))
    with pytest.raises(ArchError, match="neither 'mlp', 'cnn' nor 'module:factory'"):
        parse_arch("resnet50")


# ---------------------------------------------------------------------------------------------
# regressions from the CLI hardening issue
# ---------------------------------------------------------------------------------------------

def test_every_plan_path_is_relative_to_the_plan_folder(tmp_path, monkeypatch):
    import torch

    from hetmerge.cli.models import load_model as _load_model

    proj = tmp_path / "proj"
    (proj / "nets").mkdir(parents=True)
    (proj / "nets" / "arch.py").write_text(
        "import torch.nn as nn\ndef make(width=6):\n    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), "
        "nn.Linear(width, 2))\n")
    (proj / "planmods_x.py").write_text((proj / "nets" / "arch.py").read_text())   # a module beside the plan
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    from hetmerge.checkpoint import save_state
    save_state(net.state_dict(), proj / "a.safetensors")
    save_state(net.state_dict(), proj / "b.pt")
    (proj / "al.json").write_text("{}")
    import numpy as np
    np.savez(proj / "d.npz", X=np.zeros((2, 4), np.float32), y=np.zeros(2, np.int64))
    p = _plan(proj, """
base: {arch: nets/arch.py:make, weights: a.safetensors}
target: {arch: {factory: "planmods_x:make", kwargs: {width: 6}}, weights: b.pt}
alignment: al.json
data: d.npz
target_data: d.npz
""")
    monkeypatch.chdir(tmp_path)          # somewhere else: nothing may resolve against the cwd
    plan = load_plan(path=p)
    assert plan.base.weights == proj / "a.safetensors" and plan.alignment == proj / "al.json"
    assert plan.options.data == str(proj / "d.npz") == plan.options.target_data
    for ref, side in ((plan.base, "base"), (plan.target, "target")):
        model, _ = _load_model(ref, side)
        x = torch.randn(3, 4)
        torch.testing.assert_close(model(x), net(x))
    # flags stay relative to the current folder
    plan = load_plan(path=p, overrides={"data": "here.npz"})
    assert plan.options.data == "here.npz"


@pytest.mark.parametrize("text, match", [
    ("lam: {fc0: 0.2, fc0: 0.3}", r"key 'fc0' is given twice"),
    ("lam: 0.2\nlam: 0.3", r"key 'lam' is given twice"),
    ("lam: 'fc0=0.2,fc0=0.3'", r"lam: layer 'fc0' is given twice \(fc0=0.2 and fc0=0.3\)"),
    ("lambdas: [0, 0.5, 0.5, 1]", r"lambdas: λ value\(s\) \[0.5\] appear more than once"),
    ("allow_nonfinite: maybe", r"allow_nonfinite: expected true or false"),
    ("base: {weights: a.safetensors, sub_key: 3}", r"base.sub_key: expected a string"),
])
def test_duplicated_keys_and_values_name_the_duplicate(files, text, match):
    base = "target: b.pt\n" if text.startswith("base:") else "base: a.safetensors\ntarget: b.pt\n"
    with pytest.raises(PlanError, match=match):
        load_plan(path=_plan(files, base + text))


def test_json_plans_refuse_duplicate_keys(files):
    p = _plan(files, '{"base": "a.safetensors", "target": "b.pt", "lam": 0.1, "lam": 0.9}', ".json")
    with pytest.raises(PlanError, match="key 'lam' is given twice"):
        load_plan(path=p)


def test_plan_layout_keys_and_allow_nonfinite(files):
    p = _plan(files, "base: {weights: a.safetensors, key_prefix: 'module.'}\n"
                     "target: {weights: b.pt, sub_key: model_ema}\nallow_nonfinite: true\n")
    plan = load_plan(path=p)
    assert plan.base.key_prefix == "module." and plan.target.sub_key == "model_ema"
    assert plan.options.allow_nonfinite is True
    plan = load_plan(path=p, overrides={"sub_key": "ema", "key_prefix": ""})
    assert plan.base.sub_key == plan.target.sub_key == "ema" and plan.base.key_prefix == ""
