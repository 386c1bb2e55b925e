"""hm.Alignment: the pairing and maps that merging needs, saved as strict, versioned JSON and
checked against the models it is applied to."""
import json

import pytest
import torch

import hetmerge as hm
from hetmerge import models as hmm
from hetmerge.alignment import Alignment, AlignmentError


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base, target = hmm.mlp(16, [24, 12], 5), hmm.mlp(16, [16, 12], 5)
    return base, target, hm.align(base, target, seed=0)


def test_align_result_carries_an_alignment(pair):
    base, target, res = pair
    assert isinstance(res.alignment, Alignment)
    assert res.maps is res.alignment.maps and res.pairing is res.alignment.pairing
    assert res.cases == {"fc0": "size-compatible", "fc1": "size-compatible", "head": "same size"}


def test_save_load_round_trip_is_exact_and_strict_json(pair, tmp_path):
    base, target, res = pair
    res.alignment.fingerprints = {"base": {"kind": "blake2b-all-bytes", "digest": "ab"}}
    path = res.alignment.save(tmp_path / "a.json")
    doc = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert doc["format"] == "hetmerge-alignment" and doc["version"] == 2
    back = Alignment.load(path, base=base, target=target)
    assert back.maps.keys() == res.maps.keys()
    for n in res.maps:
        assert torch.equal(back.maps[n], res.maps[n])
    assert back.fingerprints["base"]["digest"] == "ab"
    # merging with the loaded alignment gives the same model as with the result
    m1 = hm.merge(base, target, res, lam=0.4)
    m2 = hm.merge(base, target, back, lam=0.4)
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


def test_nan_info_is_written_as_null(pair, tmp_path):
    base, target, res = pair
    a = Alignment(res.pairing, res.maps, info={"objective": float("nan")})
    doc = json.loads(a.save(tmp_path / "n.json").read_text())
    assert doc["info"]["objective"] is None


@pytest.mark.parametrize("bad, match", [
    (lambda m: m[:-1], "length"),                                      # too short
    (lambda m: torch.cat([m[:1], m[:1], m[2:]]), "distinct"),          # a target unit twice
    (lambda m: torch.where(m == m.max(), torch.tensor(99), m), "< 16"),  # out of range
    (lambda m: torch.where(m == m.max(), torch.tensor(-2), m), "-1 = padding"),
])
def test_validate_rejects_maps_that_do_not_fit(pair, bad, match):
    base, target, res = pair
    maps = dict(res.maps)
    maps["fc0"] = bad(maps["fc0"].clone())
    with pytest.raises(AlignmentError, match=match):
        Alignment(res.pairing, maps)


def test_validate_rejects_missing_and_extra_links(pair):
    _, _, res = pair
    with pytest.raises(AlignmentError, match="no map for link 'fc1'"):
        Alignment(res.pairing, {k: m for k, m in res.maps.items() if k != "fc1"})
    with pytest.raises(AlignmentError, match=r"maps \['zz'\] match no link"):
        Alignment(res.pairing, {**res.maps, "zz": torch.arange(3)})


def test_load_rejects_other_files_and_future_versions(pair, tmp_path):
    base, target, res = pair
    (tmp_path / "x.json").write_text("{]")
    with pytest.raises(AlignmentError, match="not a JSON file"):
        Alignment.load(tmp_path / "x.json", base=base, target=target)
    doc = res.alignment.to_dict()
    doc["version"] = 99
    (tmp_path / "v.json").write_text(json.dumps(doc))
    with pytest.raises(AlignmentError, match="version 99"):
        Alignment.load(tmp_path / "v.json", base=base, target=target)
    with pytest.raises(AlignmentError, match="no such file"):
        Alignment.load(tmp_path / "missing.json", base=base, target=target)


def test_fingerprint_check_names_the_changed_side(pair):
    _, _, res = pair
    a = Alignment(res.pairing, res.maps, fingerprints={"base": {"kind": "k", "digest": "1"},
                                                        "target": {"kind": "k", "digest": "2"}})
    assert a.check_fingerprints({"base": {"kind": "k", "digest": "1"},
                                 "target": {"kind": "k", "digest": "3"}}) == (["target"], [])
    # a fingerprint of another kind (an older file) cannot vouch for the weights: it is reported
    assert a.check_fingerprints({"target": {"kind": "other", "digest": "3"}}) == ([], ["target"])


def test_reprs_are_short_summaries(pair):
    _, _, res = pair
    for text in (repr(res), repr(res.alignment)):
        assert len(text) < 200 and "tensor(" not in text
    assert f"{len(res.maps)} maps" in repr(res) and "2 size-compatible" in repr(res)


def test_pairing_prints_a_short_summary(pair):
    _, _, res = pair
    text = repr(res.pairing)
    assert text.startswith("Pairing(3 layers [fc0<-fc0, fc1<-fc1, head<-head]") and "tensor(" not in text
    assert "2 size-compatible" in text and len(text) < 200
