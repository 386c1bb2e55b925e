"""`hetmerge inspect` and `hetmerge merge` on Hugging Face model directories."""
import pytest
import torch

from hetmerge.heads import random_perms
from hetmerge.cli import EXIT_FILE, EXIT_INCOMPATIBLE, EXIT_OK, main
from hf_models import build, outputs

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    for name, family, seed in (("a", "llama", 0), ("b", "llama", 1), ("g", "gpt2", 0)):
        model, _ = build(family, seed)
        model.save_pretrained(root / name)
    return root


def test_inspect_directories_prints_the_transformer_groups(dirs, capsys):
    assert main(["inspect", str(dirs / "a"), str(dirs / "b")]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Hugging Face, llama" in out and "residual" in out and "model.layers.1.mlp" in out
    assert "model.layers.1.attn.qk" in out and "model.layers.1.attn.vo" in out
    assert "attention heads move as whole heads" in out and "V/O dimensions move inside a head" in out


def test_merge_directories_is_the_linear_merge_and_loads(dirs, capsys):
    out = dirs / "m"
    assert main(["merge", str(dirs / "a"), str(dirs / "b"), "--lam", "0.3", "-o", str(out)]) == EXIT_OK
    a, inputs = build("llama", 0)
    b, _ = build("llama", 1)
    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, 0.7 * sa[k] + 0.3 * sb[k], rtol=1e-6, atol=1e-6)
    assert outputs(merged, inputs).isfinite().all()


def test_merge_directories_refuses_inputs_families_and_alignment(dirs, capsys):
    a, b, g = (str(dirs / n) for n in "abg")
    assert main(["merge", a, b, "--lam", "0.3", "-o", a]) == EXIT_FILE
    assert "overwrite an input" in capsys.readouterr().err
    assert main(["merge", a, g, "--lam", "0.3", "-o", str(dirs / "x")]) == EXIT_INCOMPATIBLE
    assert "model_type 'gpt2' differs" in capsys.readouterr().err
    assert not (dirs / "x").exists()


def test_align_then_merge_directories_recovers_a_planted_permutation(dirs, tmp_path, capsys):
    import copy

    from hetmerge.maps import permute_state
    from hetmerge.transformer_spec import AlignView, transformer_spec

    model, inputs = build("llama", 0)
    view = AlignView(model)
    spec = transformer_spec(view)
    perms = random_perms(spec, torch.Generator().manual_seed(5))     # heads move whole
    shuffled = AlignView(copy.deepcopy(model))
    shuffled.load_state_dict(permute_state(spec, view.state_dict(), perms))
    torch.testing.assert_close(outputs(shuffled.model, inputs), outputs(model, inputs), rtol=1e-5, atol=1e-5)
    shuffled.model.save_pretrained(tmp_path / "p")

    al, out = tmp_path / "al.json", tmp_path / "m"
    assert main(["align", str(dirs / "a"), str(tmp_path / "p"), "-o", str(al)]) == EXIT_OK
    assert main(["merge", str(dirs / "a"), str(tmp_path / "p"), "--alignment", str(al), "--lam", "1",
                 "-o", str(out)]) == EXIT_OK
    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    # the aligned, un-shuffled copy at λ = 1 is the original model, tensor for tensor
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], rtol=0, atol=1e-6)
    # an alignment computed for other directories does not fit these
    assert main(["merge", str(dirs / "a"), str(dirs / "g"), "--alignment", str(al), "--lam", "0.5",
                 "-o", str(tmp_path / "x")]) == EXIT_INCOMPATIBLE


def test_merge_directories_with_per_block_lambda(dirs, capsys):
    out = dirs / "per_block"
    assert main(["merge", str(dirs / "a"), str(dirs / "b"), "--lam", "model.layers.1=0.4", "-o", str(out)]) == EXIT_OK
    a, _ = build("llama", 0)
    b, _ = build("llama", 1)
    merged = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in merged.state_dict().items():
        want = 0.6 * sa[k] + 0.4 * sb[k] if k.startswith("model.layers.1.") else sa[k]
        torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6)


def test_per_block_lambda_errors_name_the_blocks(dirs, capsys):
    from hetmerge.cli import EXIT_USAGE
    code = main(["merge", str(dirs / "a"), str(dirs / "b"), "--lam", "model.layers.7=0.4", "-o", str(dirs / "bad")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "'model.layers.7' is not a block of the base" in err and "model.layers.1" in err
    assert not (dirs / "bad").exists()


def test_align_whole_heads_is_remembered_by_merge(dirs, tmp_path, capsys):
    """--heads whole: the qk/vo maps move heads only; merge reads the choice back from the file, and
    --heads on checkpoint files is a usage error."""
    import json
    al = tmp_path / "whole.json"
    assert main(["align", str(dirs / "a"), str(dirs / "b"), "--heads", "whole", "-o", str(al)]) == EXIT_OK
    doc = json.loads(al.read_text())
    assert doc["info"]["hf"]["heads"] == "whole"
    assert len(doc["maps"]["model.layers.0.attn.vo"]) == 2       # 2 key/value heads, not 2 × 6 dims
    out = tmp_path / "m"
    assert main(["merge", str(dirs / "a"), str(dirs / "b"), "--alignment", str(al), "--lam", "0.5",
                 "-o", str(out)]) == EXIT_OK
    assert (out / "config.json").is_file()
    f = tmp_path / "x.safetensors"
    import safetensors.torch as st
    st.save_file({"0.weight": torch.zeros(3, 2)}, str(f))
    assert main(["align", str(f), str(f), "--heads", "whole", "-o", str(tmp_path / "y.json")]) == 2
    assert "--heads applies to Hugging Face model directories" in capsys.readouterr().err


def test_inspect_counts_the_fused_axes_of_a_group(dirs, capsys):
    """GPT-2's qk group lives only in the fused c_attn (q and k parts of weight and bias): 4 axes."""
    assert main(["inspect", str(dirs / "g"), str(dirs / "g")]) == EXIT_OK
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "transformer.h.0.attn.qk" in ln and "permutable" in ln)
    assert line.split()[1:3] == ["24", "4"], line


def test_merge_with_an_unreadable_or_altered_alignment_file_names_it(dirs, tmp_path, capsys):
    """A missing file exits 3 or 4 naming it (never a traceback); a non-JSON file and an unknown
    info.hf.heads exit 4 naming the file."""
    import json
    out = tmp_path / "m"
    missing = tmp_path / "missing.json"
    assert main(["merge", str(dirs / "a"), str(dirs / "b"), "--alignment", str(missing), "-o", str(out)]) in (3, 4)
    assert "missing.json" in capsys.readouterr().err
    junk = tmp_path / "junk.json"
    junk.write_text("not json")
    assert main(["merge", str(dirs / "a"), str(dirs / "b"), "--alignment", str(junk), "-o", str(out)]) == 4
    err = capsys.readouterr().err
    assert "junk.json" in err and "not a JSON file" in err
    al = tmp_path / "al.json"
    assert main(["align", str(dirs / "a"), str(dirs / "b"), "-o", str(al)]) == EXIT_OK
    doc = json.loads(al.read_text())
    doc["info"]["hf"]["heads"] = "sideways"
    al.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["merge", str(dirs / "a"), str(dirs / "b"), "--alignment", str(al), "-o", str(out)]) == 4
    err = capsys.readouterr().err
    assert "al.json" in err and "info.hf.heads is 'sideways'" in err
    assert not out.exists()
