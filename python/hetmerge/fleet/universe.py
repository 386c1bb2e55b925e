"""`hetmerge zoo --universe`: the C2M3 universe over the zoo (``hm.align_many(models, method="c2m3")``,
hetmerge.many), whose ``res.pair(i, j)`` aligns model j to model i with every cycle consistent. The
study loads the usable models in the driver, aligns them all at once, and sweeps each planned pair
through the universe's maps, so the report gets a second barrier heat map (universe vs pairwise
weight matching) on the same pairs. A zoo that C2M3 cannot cover as one (models of different depths
without a common layer map) is reported as such, with the reason, and the pairwise study stands.
"""
from __future__ import annotations

import warnings

__all__ = ["universe_study"]


def universe_study(cfg, usable: list[dict], pairs: list[tuple[int, int]], log=lambda s: None) -> dict:
    """{"available": False, "note"} without hm.align_many; else {"available": True, "method",
    "barrier": [n][n] (None where no pair was planned), "note"}."""
    import torch

    import hetmerge as hm

    from .tasks import load_checkpoint, load_splits

    align_many = getattr(hm, "align_many", None)
    if align_many is None:
        return {"available": False, "note": "--universe: hetmerge.align_many (C2M3) is not available in this "
                "hetmerge; the universe was not computed"}
    models = [load_checkpoint(m["file"], cfg.arch, cfg.sub_key, cfg.key_prefix)[0] for m in usable]
    log(f"C2M3 universe over {len(models)} models")
    try:
        res = align_many(models, method="c2m3")
    except ValueError as exc:   # e.g. different depths: no single universe over these models
        return {"available": False, "note": f"--universe: C2M3 cannot align these models as one: {exc}"}
    lambdas = torch.tensor(cfg.lambdas, dtype=torch.float64)
    n = len(models)
    barrier = [[None] * n for _ in range(n)]
    for i, j in pairs:
        splits = load_splits(cfg.data, models[i])
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                curve = hm.sweep(models[i], models[j], res.pair(i, j), lambdas, data=splits["val"],
                                 tol=cfg.acc_tol, fill=cfg.fill, batch_size=cfg.batch_size)
        except (ValueError, KeyError) as exc:   # a pair the universe does not cover: left empty
            log(f"universe pair {usable[i]['name']} <- {usable[j]['name']}: {exc}")
            continue
        barrier[i][j] = curve.barrier
    return {"available": True, "method": "c2m3", "barrier": barrier,
            "note": "validation loss barrier of each planned pair through the C2M3 universe's maps "
                    "(res.pair(base, target)), next to pairwise weight matching in the heat map"}
