"""The CLI's side of layer pairing: --layer-map / --lam / plan keys read layer names as names and
"#N" as positions (one resolver with the library), and models with nothing to pair exit 4 in every
command instead of writing an empty alignment or a copy of the base."""
from __future__ import annotations

import json

import pytest
import torch

from hetmerge import models as hmm
from hetmerge.checkpoint import load_state, save_state
from hetmerge.cli import EXIT_INCOMPATIBLE, EXIT_OK, EXIT_USAGE, main

from helpers_models import seq_net

BASE_W, TARGET_W = [8, 6, 5, 4, 3], [8, 7, 9, 5, 3]   # layers "0", "2", "4", "6"; every width differs


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


@pytest.fixture
def seq_ckpts(tmp_path):
    torch.manual_seed(0)
    save_state(seq_net(BASE_W).state_dict(), tmp_path / "base.safetensors")
    save_state(seq_net(TARGET_W).state_dict(), tmp_path / "target.safetensors")
    arch = lambda w: json.dumps({"factory": "helpers_models:seq_net", "kwargs": {"widths": w}})
    return [tmp_path / "base.safetensors", tmp_path / "target.safetensors",
            "--base-arch", arch(BASE_W), "--target-arch", arch(TARGET_W)]


def _inspected_pairs(capsys, tmp_path, seq_ckpts, *extra):
    out = tmp_path / "inspect.json"
    code, _, err = run(capsys, "inspect", *seq_ckpts, "--json", out, *extra)
    assert code == EXIT_OK, err
    return [(r["base layer"], r["base_shape"], r["target layer"], r["target_shape"])
            for r in json.loads(out.read_text())["layer_map"]]


def test_cli_layer_map_of_digit_names_paired_by_position(capsys, tmp_path, seq_ckpts):
    # on main "2=2" paired the layers at position 2 ("4" with "4")
    assert _inspected_pairs(capsys, tmp_path, seq_ckpts, "--layer-map", "2=2") == [("2", [5, 6], "2", [9, 7])]
    assert _inspected_pairs(capsys, tmp_path, seq_ckpts, "--layer-map", "#1=#1") == [("2", [5, 6], "2", [9, 7])]
    # on main "2=4" was an IndexError (position 4 of 4 layers)
    assert _inspected_pairs(capsys, tmp_path, seq_ckpts, "--layer-map", "2=4") == [("2", [5, 6], "4", [5, 9])]
    plan = tmp_path / "plan.yaml"    # YAML reads {2: 4} as ints: still the names "2" and "4"
    plan.write_text("layer_map: {2: 4}\n")
    assert _inspected_pairs(capsys, tmp_path, seq_ckpts, "--plan", plan) == [("2", [5, 6], "4", [5, 9])]


@pytest.mark.parametrize("lm, needle", [
    ("2=9", "layer_map: target layer '9' is not a layer of the target; layers: #0 0, #1 2, #2 4, #3 6. "
            "Fix layer_map"),
    ("#4=2", "layer_map: base layer '#4': position 4 is out of range, the base has 4 layers"),
])
def test_cli_unknown_layer_or_position_exits_2_not_index_error(capsys, tmp_path, seq_ckpts, lm, needle):
    for cmd in ("inspect", "align", "merge"):
        out = tmp_path / f"{cmd}.out"
        code, _, err = run(capsys, cmd, *seq_ckpts, "--layer-map", lm, *(("-o", out) if cmd != "inspect" else ()))
        assert code == EXIT_USAGE and needle in err, (cmd, err)
        assert not out.exists()


def test_cli_lam_keys_resolve_like_layer_map_keys(capsys, tmp_path, seq_ckpts):
    al = tmp_path / "al.json"
    code, _, err = run(capsys, "align", *seq_ckpts, "--layer-map", "0=0,2=2", "-o", al)
    assert code == EXIT_OK, err
    outs = {}
    for lam in ("2=0.2", "#1=0.2"):
        outs[lam] = tmp_path / f"m{len(outs)}.safetensors"
        code, _, err = run(capsys, "merge", *seq_ckpts, "--layer-map", "0=0,2=2", "--alignment", al,
                           "--lam", lam, "-o", outs[lam])
        assert code == EXIT_OK, err
    m_name, m_pos = load_state(outs["2=0.2"]), load_state(outs["#1=0.2"])
    a = load_state(seq_ckpts[0])
    b = load_state(seq_ckpts[1])
    doc = json.loads(al.read_text())
    by_size = {v["n_base"]: torch.tensor(doc["maps"][k]) for k, v in doc["links"].items() if v["solved"]}
    rows, cols = by_size[5], by_size[6]      # layer "2": 5 outputs, 6 inputs in the base
    ref = 0.8 * a["2.weight"] + 0.2 * b["2.weight"][rows][:, cols]
    torch.testing.assert_close(m_name["2.weight"], ref)
    for k in a:
        assert torch.equal(m_name[k], m_pos[k]), k
        if not k.startswith("2."):
            assert torch.equal(m_name[k], a[k]), k     # λ only for layer "2"
    code, _, err = run(capsys, "merge", *seq_ckpts, "--alignment", al, "--layer-map", "0=0,2=2",
                       "--lam", "#9=0.2", "-o", tmp_path / "x.safetensors")
    assert code == EXIT_USAGE and "lam: '#9': position 9 is out of range" in err
    code, _, err = run(capsys, "merge", *seq_ckpts, "--alignment", al, "--layer-map", "0=0,2=2",
                       "--lam", "4=0.2", "-o", tmp_path / "x.safetensors")
    assert code == EXIT_USAGE and "lam: layer(s) ['4'] are not in layer_map" in err   # the plan's own check
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_cnn_against_mlp_passed_with_nothing_to_align(capsys, tmp_path):
    torch.manual_seed(0)
    save_state(hmm.cnn(1, [4, 4], 10, (8, 8)).state_dict(), tmp_path / "cnn.safetensors")
    save_state(hmm.mlp(64, [16], 10).state_dict(), tmp_path / "mlp.safetensors")
    models = [tmp_path / "cnn.safetensors", tmp_path / "mlp.safetensors",
              "--base-arch", json.dumps({"type": "cnn", "spatial": [8, 8]}),
              "--target-arch", "mlp"]
    for cmd, extra in (("inspect", ()), ("align", ("-o", tmp_path / "al.json")),
                       ("merge", ("-o", tmp_path / "m.safetensors")),
                       ("sweep", ("--data", "digits", "-o", tmp_path / "sweep"))):
        code, out, err = run(capsys, cmd, *models, *extra)
        assert code == EXIT_INCOMPATIBLE, (cmd, code, err)
        assert "nothing to align" in err and "conv0 [Conv2d 3x3 (hidden)]" in err and "fc0 [Linear (hidden)]" in err
        assert "plan OK" not in out
    for f in ("al.json", "m.safetensors", "sweep"):
        assert not (tmp_path / f).exists(), f
