"""`hetmerge zoo`: every pair of a checkpoint folder aligned and swept; resumable after an
interruption with the same report; heat map = hm.sweep's barrier per pair; alignments usable by
`hetmerge merge`; sampling, incompatible pairs, failures, the C2M3 hook and bad inputs."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import fleet_helpers as H
import hetmerge as hm
from hetmerge.cli.main import main
from hetmerge.fleet import tasks as T

LAMBDAS = ["--lambdas", "0,0.25,0.5,0.75,1"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def study(capsys, zoo, out, *extra):
    threads = torch.get_num_threads(), hm.get_num_threads()
    try:
        return run(capsys, "zoo", zoo, "--data", "digits", "-o", out, *LAMBDAS, "-q", "--threads", "1", *extra)
    finally:   # --threads sets this process's threads: leave them as other tests expect
        torch.set_num_threads(threads[0])
        hm.set_num_threads(threads[1])


def report(out):
    return json.loads((out / "report.json").read_text())


def results(rep):
    """The report without what may differ between runs of one study (timings, versions)."""
    return {k: v for k, v in rep.items() if k != "run"}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return H.make_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def full(zoo, tmp_path_factory):
    """One uninterrupted study of the 4-model zoo, in process, with one thread as pool workers have
    (the alignment objective's last bits depend on the thread count; maps and curves do not)."""
    out = tmp_path_factory.mktemp("full") / "out"
    threads = torch.get_num_threads(), hm.get_num_threads()
    try:
        assert main(["zoo", str(zoo), "--data", "digits", "-o", str(out), *LAMBDAS, "-q", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads[0])
        hm.set_num_threads(threads[1])
    return out


def copy_of(full, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(full, dst)
    return dst


def test_full_study_report(full, zoo):
    rep = report(full)
    names = sorted(H.ZOO)
    assert [m["name"] for m in rep["models"]] == names and all(m["status"] == "ok" for m in rep["models"])
    assert rep["pair_counts"] == {"ok": 12, "incompatible": 0, "failed": 0}
    assert {(p["base"], p["target"]) for p in rep["pairs"]} == {(b, t) for b in names for t in names if b != t}
    assert rep["heatmap"]["labels"] == names
    assert all(rep["heatmap"]["barrier"][i][i] is None for i in range(4))
    assert (full / "barrier_heatmap.png").stat().st_size > 10_000 and (full / "report.md").exists()
    json.loads((full / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    # assembly order: the best model on validation, then ascending barrier to it
    best = max(rep["models"], key=lambda m: (m["val"]["acc"], -m["val"]["loss"]))["name"]
    order = rep["assembly_order"]
    assert order["base"] == best and not order["unplaced"]
    heat = {(p["base"], p["target"]): p["sweep"]["barrier"] for p in rep["pairs"]}
    assert [e["model"] for e in order["order"]] == sorted((n for n in names if n != best),
                                                          key=lambda n: heat[(best, n)])
    # a size-incompatible pair is among them (tapered 48-16 against 32x3)
    cases = {(p["base"], p["target"]): set(p["compat"]["cases"].values()) for p in rep["pairs"]}
    assert "size-incompatible" in cases[("c32x3", "d48-16")]
    assert all(p["compat"]["memory"]["align_peak"] > 0 for p in rep["pairs"])


def test_heatmap_values_equal_direct_sweep(full, zoo):
    """Every heat-map cell is hm.sweep's barrier of hm.align(base, target) on the validation split,
    computed here directly; λ* and the test barrier likewise."""
    rep = report(full)
    labels = rep["heatmap"]["labels"]
    models = {n: T.load_checkpoint(str(zoo / f"{n}.safetensors"))[0] for n in labels}
    splits = T.load_splits("digits", models[labels[0]])
    lams = torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=torch.float64)
    by_pair = {(p["base"], p["target"]): p for p in rep["pairs"]}
    for i, b in enumerate(labels):
        for j, t in enumerate(labels):
            if i == j:
                continue
            c = hm.sweep(models[b], models[t], hm.align(models[b], models[t]), lams, data=splits["val"],
                         target_data=splits["test"])
            assert rep["heatmap"]["barrier"][i][j] == c.barrier, (b, t)
            s = by_pair[(b, t)]["sweep"]
            assert (s["lam_star"], s["test_barrier"]) == (c.lam_star, c.target_barrier)


def test_interrupted_study_resumes_without_recomputing(full, zoo, tmp_path, capsys, monkeypatch):
    import hetmerge.cli.zoo as Z

    out, k = tmp_path / "out", 5
    calls = []
    real_task, real_saved = T.pair_task, Z.pair_saved

    def counting_task(*a):
        calls.append(a[:2])
        return real_task(*a)

    def interrupt_after_k(ui, bar, doc, reused):   # Ctrl-C right after the k-th pair is saved
        real_saved(ui, bar, doc, reused)
        if len(calls) == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "pair_task", counting_task)
    monkeypatch.setattr(Z, "pair_saved", interrupt_after_k)
    code, _, err = study(capsys, zoo, out)
    assert code == 130 and "interrupted" in err
    # the k-th pair was saved; saves already under way when Ctrl-C came were finished, not dropped
    saved = sorted((out / "pairs").glob("*.json"))
    m = len(saved)
    assert k <= m <= k + 1 and m == len(calls)
    assert sorted(f.name for f in (out / "alignments").glob("*.json")) == [f.name for f in saved]
    assert not list(out.rglob("*.tmp")) and not (out / "report.json").exists()
    mtimes = {f: f.stat().st_mtime_ns for f in saved}

    monkeypatch.setattr(Z, "pair_saved", real_saved)
    calls.clear()
    code, _, _ = study(capsys, zoo, out)
    assert code == 0
    assert len(calls) == 12 - m                                   # only the unfinished pairs ran
    assert {f: f.stat().st_mtime_ns for f in saved} == mtimes      # finished ones were not rewritten
    rep = report(out)
    assert (rep["run"]["pairs_reused"], rep["run"]["pairs_computed"]) == (m, 12 - m)
    assert results(rep) == results(report(full))


def test_alignment_files_feed_hetmerge_merge(full, zoo, tmp_path, capsys):
    p = next(p for p in report(full)["pairs"] if (p["base"], p["target"]) == ("b48", "a32"))
    af = full / p["alignment_file"]
    base, target = (T.load_checkpoint(str(zoo / f"{n}.safetensors"))[0] for n in ("b48", "a32"))
    al = hm.Alignment.load(af, base=base, target=target)
    assert {n: m.tolist() for n, m in al.maps.items()} == \
        {n: m.tolist() for n, m in hm.align(base, target).maps.items()}
    code, _, err = run(capsys, "merge", zoo / "b48.safetensors", zoo / "a32.safetensors", "--alignment", af,
                       "--lam", "0.25", "-o", tmp_path / "m.safetensors", "-q")
    assert code == 0 and "differ" not in err and "cannot check" not in err   # fingerprints match


def test_sample_and_one_way_reuse_the_full_study(full, zoo, tmp_path, capsys):
    from hetmerge.fleet.study import ZooConfig, plan_pairs, ranked

    out = copy_of(full, tmp_path)
    code, _, _ = study(capsys, zoo, out, "--pairs", "4", "--sample", "3")
    rep = report(out)
    assert code == 0 and rep["run"]["pairs_computed"] == 0 and len(rep["pairs"]) == 4
    usable = rep["models"]
    want = plan_pairs(usable, ZooConfig(zoo, out, "digits", pairs=4, sample_seed=3))
    assert [(p["base"], p["target"]) for p in rep["pairs"]] == [(usable[i]["name"], usable[j]["name"])
                                                                 for i, j in want]
    full_pairs = {(p["base"], p["target"]): p for p in report(full)["pairs"]}
    assert all(p == full_pairs[(p["base"], p["target"])] for p in rep["pairs"])

    code, _, _ = study(capsys, zoo, out, "--one-way")
    rep = report(out)
    rank = [m["name"] for m in ranked(usable)]
    assert len(rep["pairs"]) == 6 and all(rank.index(p["base"]) < rank.index(p["target"]) for p in rep["pairs"])


def test_process_pool_study_equals_in_process(full, zoo, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = study(capsys, zoo, out, "--jobs", "2", "--pairs", "3", "--sample", "1")
    rep = report(out)
    assert code == 0 and (rep["run"]["executor"], rep["run"]["workers"]) == ("pool", 2)
    assert rep["run"]["pairs_computed"] == 3
    full_pairs = {(p["base"], p["target"]): p for p in report(full)["pairs"]}
    assert all(p == full_pairs[(p["base"], p["target"])] for p in rep["pairs"])
    assert rep["models"] == report(full)["models"]


def test_all_models_unusable_still_reports(zoo, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for n in ("x", "y"):   # 10 input features: the digits data (64) does not fit them
        from hetmerge import models
        from hetmerge.checkpoint import save_state
        save_state(models.mlp(10, [8], 3).state_dict(), bad / f"{n}.safetensors")
    code, _, err = study(capsys, bad, tmp_path / "o", "--retries", "0")
    rep = report(tmp_path / "o")
    assert code == 0 and [m["status"] for m in rep["models"]] == ["failed", "failed"]
    assert "64 features per sample but the base model takes 10" in rep["models"][0]["reason"]
    assert rep["pairs"] == [] and rep["assembly_order"]["base"] is None
    assert (tmp_path / "o" / "barrier_heatmap.png").exists()


def test_incompatible_pair_is_recorded_not_retried(full, zoo, tmp_path, capsys):
    z2 = tmp_path / "zoo"
    shutil.copytree(zoo, z2)
    H.make_zoo(tmp_path / "cnn", cnn=True)
    shutil.copy(tmp_path / "cnn" / "e_cnn.safetensors", z2)
    out = copy_of(full, tmp_path)
    code, _, _ = study(capsys, z2, out)
    rep = report(out)
    assert code == 0 and rep["pair_counts"] == {"ok": 12, "incompatible": 8, "failed": 0}
    assert rep["run"]["pairs_computed"] == 8      # the MLP pairs were reused (same weights, same options)
    for p in rep["pairs"]:
        if "e_cnn" in (p["base"], p["target"]):
            assert p["status"] == "incompatible" and p["reason"].startswith("pair_specs: nothing to align")
    saved = json.loads(next((out / "pairs").glob("e_cnn*__*.json")).read_text())
    assert saved["attempts"] == 1
    idx = rep["heatmap"]["labels"].index("e_cnn")
    assert all(v is None for v in rep["heatmap"]["barrier"][idx])
    assert {e["model"] for e in rep["assembly_order"]["unplaced"]} == {"e_cnn"}


def test_failed_pair_is_reported_then_retried_on_rerun(full, zoo, tmp_path, capsys, monkeypatch):
    out = copy_of(full, tmp_path)
    victim = next((out / "pairs").glob("a32*__b48*.json"))
    victim.unlink()
    real = T.pair_task

    def broken(*a):
        raise RuntimeError("simulated out of memory")
    monkeypatch.setattr(T, "pair_task", broken)
    code, stdout, err = study(capsys, zoo, out, "--retries", "1")
    rep = report(out)
    assert code == 0 and rep["pair_counts"]["failed"] == 1 and "rerun the command to retry" in err
    bad = next(p for p in rep["pairs"] if p["status"] == "failed")
    assert (bad["base"], bad["target"]) == ("a32", "b48")
    assert bad["errors"] == ["RuntimeError: simulated out of memory"] * 2
    saved = json.loads(next((out / "pairs").glob("a32*__b48*.json")).read_text())
    assert "in broken" in saved["traceback"]   # for the bug report; not in report.json
    monkeypatch.setattr(T, "pair_task", real)
    code, _, _ = study(capsys, zoo, out)
    assert code == 0 and results(report(out)) == results(report(full))


def test_universe_hook(full, zoo, tmp_path, capsys, monkeypatch):
    out = copy_of(full, tmp_path)
    monkeypatch.delattr(hm, "align_many", raising=False)
    code, _, err = study(capsys, zoo, out, "--universe")
    assert code == 0 and "align_many (C2M3) is not available" in err
    assert report(out)["universe"]["available"] is False

    class PairwiseUniverse:   # stands in for hm.align_many's result until C2M3 is merged
        def __init__(self, models):
            self.models = models

        def pair(self, i, j):
            return hm.align(self.models[i], self.models[j]).alignment

    monkeypatch.setattr(hm, "align_many", lambda models, method: PairwiseUniverse(models), raising=False)
    code, _, _ = study(capsys, zoo, out, "--universe")
    rep = report(out)
    assert code == 0 and rep["universe"]["available"] is True
    assert rep["universe"]["barrier"] == rep["heatmap"]["barrier"]


def test_bad_inputs_are_named(zoo, tmp_path, capsys):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(zoo / "a32.safetensors", one)
    code, _, err = study(capsys, one, tmp_path / "o1")
    assert code == 2 and "found 1 checkpoint(s)" in err and "at least 2" in err
    code, _, err = run(capsys, "zoo", zoo, "-o", tmp_path / "o2")
    assert code == 2 and "--data" in err
    code, _, err = study(capsys, tmp_path / "nope", tmp_path / "o3")
    assert code == 3 and "nope" in err
    npz = tmp_path / "d.npz"
    np.savez(npz, X_test=np.zeros((4, 64), np.float32), y_test=np.zeros(4, np.int64))
    code, _, err = run(capsys, "zoo", zoo, "--data", npz, "-o", tmp_path / "o4")
    assert code == 4 and "lacks X_val, y_val" in err
    code, _, err = study(capsys, zoo, tmp_path / "o5", "--address", "auto")
    assert code == 2 and "--address: only with --executor ray" in err
    code, _, err = study(capsys, zoo, tmp_path / "o6", "--pairs", "0")
    assert code == 2 and "--pairs: expected an integer >= 1, got 0" in err
    code, _, err = study(capsys, zoo, zoo)
    assert code == 2 and "is ZOO_DIR itself" in err
    (tmp_path / "o7").write_text("x")
    code, _, err = study(capsys, zoo, tmp_path / "o7")
    assert code == 3 and "exists and is not a folder" in err


def test_output_inside_the_zoo_is_not_scanned(full, zoo, tmp_path, capsys):
    z2 = tmp_path / "zoo"
    shutil.copytree(zoo, z2)
    shutil.copytree(full, z2 / "study")
    (z2 / "study" / "stray.safetensors").write_bytes((zoo / "a32.safetensors").read_bytes())
    code, _, _ = study(capsys, z2, z2 / "study")
    rep = report(z2 / "study")
    assert code == 0 and [m["name"] for m in rep["models"]] == sorted(H.ZOO)
    assert rep["run"]["pairs_reused"] == 12


def test_nonfinite_model_is_left_out_unless_allowed(full, zoo, tmp_path, capsys):
    from hetmerge.checkpoint import load_state, save_state

    z2 = tmp_path / "zoo"
    shutil.copytree(zoo, z2)
    sd = load_state(zoo / "a32.safetensors")
    sd["fc0.weight"][0, :3] = float("nan")
    save_state(sd, z2 / "nan.safetensors")
    out = copy_of(full, tmp_path)
    code, _, _ = study(capsys, z2, out)
    rep = report(out)
    bad = next(m for m in rep["models"] if m["name"] == "nan")
    assert code == 0 and bad["status"] == "excluded" and "'fc0.weight' (3 values)" in bad["reason"]
    assert "--allow-nonfinite" in bad["reason"] and rep["run"]["pairs_computed"] == 0
    assert "nan" not in rep["heatmap"]["labels"]
    code, _, _ = study(capsys, z2, out, "--allow-nonfinite", "--retries", "0", "--one-way", "--pairs", "2")
    assert code == 0 and "nan" in report(out)["heatmap"]["labels"]
