"""`hetmerge assemble` in-process: a zoo of digits MLPs of different widths (and one CNN the base
cannot be paired with) saved to files; the report's numbers equal hm.assemble's on the same models
and splits, the written checkpoint is that model, unmergeable models are skipped with the reason,
and no output may land on an input."""
from __future__ import annotations

import json

import pytest
import torch

import hetmerge as hm
from hetmerge import data as hd
from hetmerge import models as hmm
from hetmerge.checkpoint import load_state, save_state
from hetmerge.cli import EXIT_FILE, EXIT_OK, EXIT_USAGE, main
from hetmerge.zoo import load_data

from helpers_models import trained_mlp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ZOO = {"a64": (64,), "b128-32": (128, 32), "c32": (32,)}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


@pytest.fixture(scope="module")
def zoo_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("asm")
    base = trained_mlp((128, 64), 0)
    save_state(base.state_dict(), d / "base.safetensors")
    (d / "zoo").mkdir()
    for i, (name, w) in enumerate(ZOO.items()):
        save_state(trained_mlp(w, i + 1).state_dict(), d / "zoo" / f"{name}.safetensors")
    torch.manual_seed(0)   # a CNN: no layer kind in common with the MLP base
    save_state(hmm.cnn(1, [4], 10, (8, 8)).state_dict(), d / "zoo" / "d-cnn.safetensors")
    return d


def splits():
    """What `--data digits` means for assemble: the validation part hetmerge holds out of the
    digits training set, and the digits test split (built here from hetmerge.data directly)."""
    sp = load_data("digits")
    return (sp.X_val, sp.y_val), hd.digits().test


def reference(search="grid"):
    val, test = splits()
    zoo = {n: trained_mlp(w, i + 1) for i, (n, w) in enumerate(ZOO.items())}
    return hm.assemble(trained_mlp((128, 64), 0), zoo, data=val, eval_data=test, tol=0.01,
                       lambdas=torch.linspace(0, 1, 21, dtype=torch.float64), restarts=1, seed=0,
                       search=search)


@pytest.mark.parametrize("search", ["grid", "adaptive"])
def test_assemble_report_equals_hm_assemble(zoo_files, tmp_path, capsys, search):
    out = tmp_path / "assembled.safetensors"
    code, stdout, err = run(capsys, "assemble", zoo_files / "base.safetensors", zoo_files / "zoo", "--data",
                            "digits", "-o", out, "--search", search)
    assert code == EXIT_OK, err
    rep = json.loads((tmp_path / "assembled-report" / "report.json").read_text())
    ref_model, ref_steps = reference(search)
    assert [s["model"] for s in rep["steps"]] == list(ZOO) == [s.model for s in ref_steps]
    for s, r in zip(rep["steps"], ref_steps):
        assert s["lam"] == pytest.approx(r.lam, abs=1e-12)
        assert s["lam_star"] == pytest.approx(r.lam_star, abs=1e-12)
        assert s["barrier"] == pytest.approx(r.barrier, abs=1e-6)
        assert s["val"]["after"]["base_acc"] == pytest.approx(r.after["base_acc"], abs=1e-6)
        assert s["test"]["after"]["base_acc"] == pytest.approx(r.eval_after["base_acc"], abs=1e-6)
        assert s["test"]["before"]["base_acc"] == pytest.approx(r.eval_before["base_acc"], abs=1e-6)
        assert s["evaluations"] == r.curve.n_evals
        if search == "adaptive":
            assert s["evaluations"] < 21 and s["curve"]["lambdas"] == r.curve.lambdas.tolist()
    assert rep["search"] == search and rep["splits"] == {**rep["splits"], "val": 300, "test": 450}
    # the checkpoint is hm.assemble's model, and it loads into the base's architecture
    state = load_state(out)
    for k, v in ref_model.state_dict().items():
        torch.testing.assert_close(state[k], v)
    m = hmm.mlp(64, [128, 64], 10)
    m.load_state_dict(state)
    X, y = splits()[1]
    with torch.no_grad():
        acc = (m(X).argmax(-1) == y).float().mean().item()
    assert rep["final"]["test"]["base_acc"] == pytest.approx(acc, abs=1e-6)
    # the CNN is skipped with the reason, in the report and on stderr
    assert [s["model"] for s in rep["skipped"]] == ["d-cnn"]
    assert "nothing to align" in rep["skipped"][0]["reason"] and "d-cnn" in err
    for png in ("assembly.png", "lambda_curves.png"):
        assert (tmp_path / "assembled-report" / png).read_bytes()[:8] == PNG_MAGIC
    assert "skipped d-cnn" in stdout and "+a64" in stdout


def test_zoo_as_list_and_torch_output(zoo_files, tmp_path, capsys):
    out = tmp_path / "asm.pt"
    code, _, err = run(capsys, "assemble", zoo_files / "base.safetensors", zoo_files / "zoo" / "c32.safetensors",
                       zoo_files / "zoo" / "a64.safetensors", "--data", "digits", "-o", out, "--report",
                       tmp_path / "rep", "-q")
    assert code == EXIT_OK, err
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert [s["model"] for s in rep["steps"]] == ["c32", "a64"] and rep["skipped"] == []
    assert set(torch.load(out, weights_only=True)) == set(trained_mlp((128, 64), 0).state_dict())


def test_output_onto_an_input_is_refused(zoo_files, tmp_path, capsys):
    victim = zoo_files / "zoo" / "a64.safetensors"
    before = victim.read_bytes()
    code, _, err = run(capsys, "assemble", zoo_files / "base.safetensors", zoo_files / "zoo", "--data", "digits",
                       "-o", victim, "--report", tmp_path / "r")
    assert code == EXIT_FILE and "overwrite an input" in err
    assert victim.read_bytes() == before
    code, _, err = run(capsys, "assemble", zoo_files / "base.safetensors", zoo_files / "zoo", "--data", "digits",
                       "-o", tmp_path / "x.safetensors", "--report", zoo_files)
    assert code == EXIT_FILE and "holds the" in err
    assert victim.read_bytes() == before and not (tmp_path / "x.safetensors").exists()


def test_bad_zoo_and_data_arguments_are_named(zoo_files, tmp_path, capsys):
    base = zoo_files / "base.safetensors"
    code, _, err = run(capsys, "assemble", base, tmp_path / "nope.pt", "--data", "digits", "-o", tmp_path / "o.pt")
    assert code == EXIT_FILE and "nope.pt" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "assemble", base, tmp_path / "empty", "--data", "digits", "-o", tmp_path / "o.pt")
    assert code == EXIT_USAGE and "holds no checkpoint" in err
    code, _, err = run(capsys, "assemble", base, zoo_files / "zoo" / "a64.safetensors", zoo_files / "zoo",
                       "--data", "digits", "-o", tmp_path / "o.pt")
    assert code == EXIT_USAGE and "listed twice" in err
    X, y = hd.digits().test
    import numpy as np
    np.savez(tmp_path / "d.npz", X=X.numpy(), y=y.numpy())
    code, _, err = run(capsys, "assemble", base, zoo_files / "zoo", "--data", tmp_path / "d.npz",
                       "-o", tmp_path / "o.pt")
    assert code == EXIT_USAGE and "--val-data" in err
    code, _, err = run(capsys, "assemble", base, zoo_files / "zoo", "--data", tmp_path / "d.npz", "--val-data",
                       tmp_path / "d.npz", "-o", tmp_path / "o.pt")
    assert code == EXIT_USAGE and "other than --data" in err
    code, _, err = run(capsys, "assemble", base, zoo_files / "zoo" / "d-cnn.safetensors", "--data", "digits",
                       "-o", tmp_path / "o.pt")
    assert code != EXIT_OK and "no model can be paired" in err and not (tmp_path / "o.pt").exists()


def test_npz_splits_give_the_same_assembly(zoo_files, tmp_path, capsys):
    import numpy as np
    val, test = splits()
    np.savez(tmp_path / "val.npz", X=val[0].numpy(), y=val[1].numpy())
    np.savez(tmp_path / "test.npz", X_test=test[0].numpy(), y_test=test[1].numpy())
    code, _, err = run(capsys, "assemble", zoo_files / "base.safetensors", zoo_files / "zoo", "--data",
                       tmp_path / "test.npz", "--val-data", tmp_path / "val.npz", "-o", tmp_path / "o.safetensors",
                       "-q")
    assert code == EXIT_OK, err
    rep = json.loads((tmp_path / "o-report" / "report.json").read_text())
    _, ref_steps = reference()
    assert [s["lam"] for s in rep["steps"]] == pytest.approx([r.lam for r in ref_steps], abs=1e-12)
    assert [s["test"]["after"]["base_acc"] for s in rep["steps"]] == pytest.approx(
        [r.eval_after["base_acc"] for r in ref_steps], abs=1e-6)
