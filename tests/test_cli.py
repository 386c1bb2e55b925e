"""The `hetmerge` command end to end: demo --quick on digits, and inspect/align/merge/sweep/convert on
small checkpoint files in both formats; every failure gives a message and an exit code, never a bare
traceback."""
from __future__ import annotations

import json
import math
import pytest
import torch

import hetmerge as hm
from hetmerge import models
from hetmerge.checkpoint import load_state, save_state
from hetmerge.cli import EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_OK, EXIT_USAGE, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _check_png(path):
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    from PIL import Image   # matplotlib's own dependency
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 200 and im.size[1] > 150


def _finite(x):
    if isinstance(x, dict):
        return all(_finite(v) for v in x.values())
    if isinstance(x, list):
        return all(_finite(v) for v in x)
    if isinstance(x, float):
        return math.isfinite(x)
    return True


# ---------------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------------

def test_demo_quick_end_to_end(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HETMERGE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "report"
    code, stdout, _ = run(capsys, "demo", "--quick", "-o", out)
    assert code == EXIT_OK
    assert "barrier_unal" in stdout and "assembly on digits" in stdout
    rep = json.loads((out / "report.json").read_text())
    ds = rep["datasets"]["digits"]
    assert rep["versions"]["torch"] and rep["config"]["seeds"] == [0, 1]
    assert _finite(ds["barrier_unaligned"]) and _finite(ds["barrier_aligned"])
    assert _finite([s["aligned"] for s in ds["showcase"]]) and _finite([s["unaligned"] for s in ds["showcase"]])
    same = ds["showcase"][0]
    assert same["label"] == "same architecture"
    assert same["aligned"]["barrier"] < same["unaligned"]["barrier"]
    assert ds["mean_barrier_aligned"] < ds["mean_barrier_unaligned"]
    assert len(rep["assembly"]["steps"]) >= 3 and math.isfinite(rep["assembly"]["final_acc"])
    pngs = sorted(out.glob("*.png"))
    assert {p.name for p in pngs} >= {"digits_lambda_curves.png", "digits_barrier_heatmap.png",
                                      "digits_alignment_traces.png", "assembly.png"}
    for p in pngs:
        _check_png(p)
        assert f"]({p.name})" in (out / "report.md").read_text()
    # a rerun finds every model in the cache
    from hetmerge.zoo import QUICK_ARCHS, QUICK_RECIPES, train_zoo
    zoo, _ = train_zoo(["digits"], QUICK_ARCHS, (0, 1), QUICK_RECIPES, tmp_path / "cache")
    assert all(z.cached for z in zoo.values())
    assert {z.name: z.acc for z in zoo.values()} == {m["name"]: m["test_acc"] for m in rep["zoo"]}


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="console_scripts") if e.name == "hetmerge"]
    assert eps and eps[0].value == "hetmerge.cli:main"
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two small trained digits MLPs of different widths, in both formats."""
    from hetmerge import data

    d = tmp_path_factory.mktemp("ckpt")
    split = data.digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, widths, seed in (("base", [48, 48], 0), ("target", [32, 64], 1)):
            torch.manual_seed(seed)
            m = models.mlp(64, widths, 10)
            models.train(m, split.X_train, split.y_train, epochs=4, batch_size=128, seed=seed)
            save_state(m.state_dict(), d / f"{name}.safetensors")
            save_state(m.state_dict(), d / f"{name}.pt")
    finally:
        torch.set_num_threads(threads)
    return d


def _module(path, widths):
    m = models.mlp(64, widths, 10)
    m.load_state_dict(load_state(path))
    return m.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_inspect_align_merge_sweep(ckpts, tmp_path, capsys, fmt):
    base, target = ckpts / f"base.{fmt}", ckpts / f"target.{fmt}"
    code, out, _ = run(capsys, "inspect", base, target, "--json", tmp_path / "inspect.json")
    assert code == EXIT_OK
    assert "size-incompatible" in out and "zero-padding" in out and "plan OK" in out
    info = json.loads((tmp_path / "inspect.json").read_text())
    assert info["models"]["base"]["parameters"] == sum(p.numel() for p in _module(base, [48, 48]).parameters())
    assert {g["group"]: g["size"] for g in info["models"]["target"]["groups"]}["fc1"] == 64
    assert info["memory_estimate_bytes"]["align_peak"] > 0

    code, out, _ = run(capsys, "align", base, target, "-o", tmp_path / "al.json", "--restarts", 2)
    assert code == EXIT_OK
    doc = json.loads((tmp_path / "al.json").read_text())
    assert set(doc["maps"]) >= {"fc0", "fc1"} and len(doc["maps"]["fc0"]) == 48
    assert doc["info"]["trace"][-1] >= doc["info"]["trace"][0] and len(doc["info"]["restart_objectives"]) == 2

    merged = tmp_path / f"merged.{fmt}"
    code, out, _ = run(capsys, "merge", base, target, "--alignment", tmp_path / "al.json", "--lam", 0.3,
                       "-o", merged)
    assert code == EXIT_OK and merged.exists()
    # the CLI's merge is the library's merge with the same maps
    b, t = _module(base, [48, 48]), _module(target, [32, 64])
    res = hm.align(b, t, restarts=2)   # same seeds -> same maps as the file
    assert all(doc["maps"][n] == m.tolist() for n, m in res.maps.items())
    want = hm.merge(b, t, res, lam=0.3).state_dict()
    got = load_state(merged)
    for k in want:
        torch.testing.assert_close(got[k], want[k])

    code, out, _ = run(capsys, "sweep", base, target, "--alignment", tmp_path / "al.json", "--data", "digits",
                       "--lambdas", 5, "-o", tmp_path / "sw")
    assert code == EXIT_OK
    sw = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert sw["lambdas"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert _finite(sw["aligned"]["loss"]) and sw["aligned"]["barrier"] < sw["unaligned"]["barrier"]
    _check_png(tmp_path / "sw" / "sweep.png")


def test_streaming_merge_equals_in_memory_and_per_layer_lam(ckpts, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"""
base: {{arch: mlp, weights: {ckpts / 'base.safetensors'}}}
target: {{arch: {{type: mlp}}, weights: {ckpts / 'target.safetensors'}}}
lam: {{fc0: 0.5, fc1: 0.2}}
fill: base
""")
    assert run(capsys, "align", "--plan", plan, "-o", tmp_path / "al.json")[0] == EXIT_OK
    a = run(capsys, "merge", "--plan", plan, "--alignment", tmp_path / "al.json", "-o", tmp_path / "s.safetensors")
    assert a[0] == EXIT_OK and "streamed" in a[1]
    b = run(capsys, "merge", "--plan", plan, "--alignment", tmp_path / "al.json", "-o", tmp_path / "m.safetensors",
            "--no-stream")
    assert b[0] == EXIT_OK and "in memory" in b[1]
    s, m = load_state(tmp_path / "s.safetensors"), load_state(tmp_path / "m.safetensors")
    base = load_state(ckpts / "base.safetensors")
    for k in m:
        torch.testing.assert_close(s[k], m[k])
    assert torch.equal(s["head.weight"], base["head.weight"])       # unlisted layer keeps the base
    assert not torch.equal(s["fc0.weight"], base["fc0.weight"])


def test_convert_round_trip(ckpts, tmp_path, capsys):
    assert run(capsys, "convert", ckpts / "base.pt", tmp_path / "b.safetensors")[0] == EXIT_OK
    a, b = load_state(ckpts / "base.pt"), load_state(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# failures: message + exit code, never a bare traceback
# ---------------------------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused(ckpts, tmp_path, capsys):
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil.pt"
    sd = dict(load_state(ckpts / "target.pt"))
    sd["extra"] = _Payload(marker)
    torch.save(sd, evil)
    for cmd in ("inspect", "align", "merge"):
        code, _, err = run(capsys, cmd, ckpts / "base.pt", evil, "-o" if cmd != "inspect" else "--json",
                           tmp_path / "o.json")
        assert code == EXIT_FILE and "refused" in err and "weights_only=True" in err
    assert not marker.exists()


def test_errors_have_messages_and_exit_codes(ckpts, tmp_path, capsys):
    base, target = ckpts / "base.safetensors", ckpts / "target.pt"
    code, _, err = run(capsys, "inspect", base, tmp_path / "missing.pt")
    assert code == EXIT_FILE and "missing.pt: no such file" in err

    code, _, err = run(capsys, "align", base, target, "--restarts", "zero")
    assert code == EXIT_USAGE and "restarts: expected an integer" in err

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {base}\ntarget: {target}\nmethd: weight\n")
    code, _, err = run(capsys, "merge", "--plan", bad)
    assert code == EXIT_USAGE and "'methd' (did you mean 'method'?)" in err

    code, _, err = run(capsys, "inspect", base, target, "--arch", '{"type": "mlp", "widths": [16, 16]}')
    assert code == EXIT_INCOMPATIBLE and "'fc0.weight' is (48, 64) in the file but (16, 64)" in err

    code, _, err = run(capsys, "inspect", base, target, "--layer-map", "fc0=fc7")
    assert code == EXIT_USAGE and "fc7" in err and "Fix layer_map" in err

    code, _, err = run(capsys, "merge", base, target, "--lam", "fc9=0.5", "-o", tmp_path / "x.safetensors")
    assert code == EXIT_USAGE and "fc9" in err
    assert not (tmp_path / "x.safetensors").exists()

    other = tmp_path / "other.safetensors"
    save_state(models.mlp(64, [20, 20], 10).state_dict(), other)
    run(capsys, "align", base, target, "-o", tmp_path / "al.json")
    code, _, err = run(capsys, "merge", base, other, "--alignment", tmp_path / "al.json", "-o", tmp_path / "y.pt")
    assert code == EXIT_INCOMPATIBLE and "rerun hetmerge align" in err

    code, _, err = run(capsys, "sweep", base, target)
    assert code == EXIT_INCOMPATIBLE and "needs evaluation data" in err

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = run(capsys, "inspect", base, tmp_path / "junk.pt")
    assert code == EXIT_FILE and "not a safetensors or PyTorch checkpoint" in err

    with pytest.raises(SystemExit) as e:   # argparse's own usage errors keep exit code 2
        main(["merge", "--no-such-flag"])
    assert e.value.code == EXIT_USAGE


def test_interrupted_merge_leaves_no_output(ckpts, tmp_path, capsys, monkeypatch):
    from hetmerge import ops

    calls = {"n": 0}
    real = ops.interpolate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    run(capsys, "align", ckpts / "base.safetensors", ckpts / "target.safetensors", "-o", tmp_path / "al.json")
    monkeypatch.setattr(ops, "interpolate", flaky)
    out = tmp_path / "merged.safetensors"
    code, _, err = run(capsys, "merge", ckpts / "base.safetensors", ckpts / "target.safetensors",
                       "--alignment", tmp_path / "al.json", "-o", out)
    assert code == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["al.json"]
