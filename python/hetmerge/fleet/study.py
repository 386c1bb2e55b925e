"""The zoo study: every checkpoint of a folder scored alone, then every (base, target) pair — or a
seeded sample of them — checked for compatibility, aligned (hm.align) and swept over λ (hm.sweep),
on any executor; resumable.

On disk, under the output folder (each file written atomically, temp + rename):

    models/<model>.json           one checkpoint: fingerprint, accuracy alone (keyed by file size+mtime)
    alignments/<base>__<target>.json   the pair's Alignment (Alignment.to_dict(): `hetmerge merge --alignment`)
    pairs/<base>__<target>.json   the pair's result; written last, so it marks the pair done

A rerun (after a crash or Ctrl-C) reuses every model and pair file whose key still matches — the
weights' digests and every option that changes a number — and computes only the rest; a pair that
failed is tried again. The report (summary.py) is built from these files alone, so an interrupted
and resumed study reports exactly what an uninterrupted one does.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import tasks

__all__ = ["ZooConfig", "find_models", "run_zoo", "plan_pairs", "WEIGHT_SUFFIXES"]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
STORE_VERSION = 1


@dataclass
class ZooConfig:
    """A zoo study. lambdas: the swept grid; acc_tol: λ* tolerance (fraction); pairs: sample this
    many (base, target) pairs with `sample_seed` (None: all); one_way: each unordered pair once, the
    better model on validation as the base; universe: also run the C2M3 universe (universe.py)."""
    zoo_dir: Path
    out: Path
    data: str
    arch: Any = "auto"
    sub_key: str | None = None
    key_prefix: str | None = None
    lambdas: list = field(default_factory=lambda: [i / 20 for i in range(21)])
    acc_tol: float = 0.01
    fill: str = "zero"
    method: str = "weight"
    objective: str = "inner"
    restarts: int = 1
    max_iter: int = 100
    tol: float = 1e-9
    seed: int = 0
    batch_size: int = 2048
    pairs: int | None = None
    sample_seed: int = 0
    one_way: bool = False
    allow_nonfinite: bool = False
    universe: bool = False

    def model_opts(self) -> dict:
        return {"arch": self.arch, "sub_key": self.sub_key, "key_prefix": self.key_prefix, "data": self.data}

    def pair_opts(self) -> dict:
        """Everything a pair's numbers depend on (besides the two weight files)."""
        keys = ("lambdas", "acc_tol", "fill", "method", "objective", "restarts", "max_iter", "tol", "seed",
                "batch_size")
        return {**self.model_opts(), **{k: getattr(self, k) for k in keys}}


def find_models(zoo_dir: Path, exclude: Path | None = None) -> list[tuple[str, Path]]:
    """[(name, path)] of every checkpoint under `zoo_dir` (recursively; names are relative paths
    without the suffix), sorted by name; files under `exclude` (the output folder) are skipped."""
    zoo_dir = Path(zoo_dir)
    if not zoo_dir.is_dir():
        raise FileNotFoundError(f"ZOO_DIR: {zoo_dir}: no such folder")
    ex = exclude.resolve() if exclude is not None else None
    found = []
    for p in sorted(zoo_dir.rglob("*")):
        if p.suffix not in WEIGHT_SUFFIXES or not p.is_file() or p.name.startswith("."):
            continue
        if ex is not None and (p.resolve() == ex or ex in p.resolve().parents):
            continue
        found.append((p.relative_to(zoo_dir).with_suffix("").as_posix(), p))
    names = [n for n, _ in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"ZOO_DIR: {zoo_dir}: several files share the name {dup[0]!r} (same path, "
                         "different suffixes); keep one checkpoint per name")
    if len(found) < 2:
        raise ValueError(f"ZOO_DIR: {zoo_dir}: found {len(found)} checkpoint(s) "
                         f"({', '.join(WEIGHT_SUFFIXES)}); a zoo study needs at least 2")
    return sorted(found)


def slug(name: str) -> str:
    """A file name for a model name: readable, and unique through a hash of the name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[-60:] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None   # missing, or not ours: computed again and replaced


def _write(path: Path, doc: dict) -> None:
    from ..report import write_json
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(doc, path)


def plan_pairs(models: list[dict], cfg: ZooConfig) -> list[tuple[int, int]]:
    """(base index, target index) pairs of `models` (usable ones, in name order): every ordered pair,
    or with one_way each unordered pair once with the better model on validation (rank) as the
    base; then a seeded sample of cfg.pairs of them, kept in order."""
    n = len(models)
    if cfg.one_way:
        rank = {m["name"]: r for r, m in enumerate(ranked(models))}
        pairs = [(i, j) if rank[models[i]["name"]] < rank[models[j]["name"]] else (j, i)
                 for i in range(n) for j in range(i + 1, n)]
    else:
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if cfg.pairs is not None and cfg.pairs < len(pairs):
        pairs = sorted(random.Random(cfg.sample_seed).sample(sorted(pairs), cfg.pairs))
    return sorted(pairs)


def ranked(models: list[dict]) -> list[dict]:
    """Usable models, best first: validation accuracy, then lower validation loss, then name."""
    def loss(m):   # NaN weights (--allow-nonfinite) give a NaN loss, stored as null
        return m["val"]["loss"] if m["val"]["loss"] is not None else float("inf")
    return sorted(models, key=lambda m: (-m["val"]["acc"], loss(m), m["name"]))


def _model_entries(cfg: ZooConfig, files, executor, on_model) -> list[dict]:
    """([model doc per file], how many were reused): every checkpoint scored, reusing models/
    files whose key matches."""
    out, todo = {}, []
    for name, path in files:
        st = path.stat()
        key = _key([STORE_VERSION, str(path.resolve()), st.st_size, st.st_mtime_ns, cfg.model_opts()])
        f = cfg.out / "models" / f"{slug(name)}.json"
        doc = _read(f)
        if doc and doc.get("key") == key and doc.get("status") == "ok":
            out[name] = doc
            if on_model:
                on_model(doc, True)
        else:
            todo.append((name, path, key, f))
    by_name = {name: (path, key, f) for name, path, key, f in todo}
    for name, path, key, f in todo:
        executor.submit(name, tasks.model_task, str(path), cfg.model_opts())
    for o in executor.results():
        path, key, f = by_name[o.key]
        doc = {"format": "hetmerge-zoo-model", "key": key, "name": o.key, "file": str(path),
               "status": "ok" if o.ok else "failed", "result": o.result, "reason": o.error,
               "errors": o.errors, "attempts": o.attempts, "wall_s": o.wall_s, "traceback": o.traceback}
        _write(f, doc)
        out[o.key] = doc
        if on_model:
            on_model(doc, False)
    return [out[name] for name, _ in files], len(files) - len(todo)


def run_zoo(cfg: ZooConfig, executor, on_model: Callable | None = None, on_pair: Callable | None = None,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Run (or resume) the study; returns the report (summary.build_report). on_model(doc, reused)
    and on_pair(doc, reused) are called as each model / pair is done and saved."""
    from . import summary
    from .universe import universe_study

    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    files = find_models(cfg.zoo_dir, exclude=cfg.out)
    log(f"{len(files)} checkpoints under {cfg.zoo_dir}")
    mdocs, models_reused = _model_entries(cfg, files, executor, on_model)
    models = []
    for d in mdocs:
        r = d.get("result") or {}
        m = {"name": d["name"], "file": d["file"], "status": d["status"], "reason": d.get("reason"),
             "fingerprint": r.get("fingerprint"), "arch": r.get("arch"), "params": r.get("params"),
             "val": r.get("val"), "test": r.get("test")}
        if d["status"] == "ok" and r.get("nonfinite") and not cfg.allow_nonfinite:
            bad = ", ".join(f"{k!r} ({n} values)" for k, n in r["nonfinite"][:3])
            m.update(status="excluded", reason=f"non-finite values (NaN/inf) in {bad}; pass --allow-nonfinite "
                     "to use it anyway")
        models.append(m)
    usable = [m for m in models if m["status"] == "ok" and m["val"] is not None]
    pairs = plan_pairs(usable, cfg)
    log(f"{len(usable)} usable models, {len(pairs)} pairs")
    popts = cfg.pair_opts()
    pdocs, todo, reused = {}, {}, 0

    def jobs():
        """Pairs to compute, produced as workers free up (saved ones are reused on the way)."""
        nonlocal reused
        for i, j in pairs:
            b, t = usable[i], usable[j]
            key = _key([STORE_VERSION, b["fingerprint"]["digest"], t["fingerprint"]["digest"], popts])
            f = cfg.out / "pairs" / f"{slug(b['name'])}__{slug(t['name'])}.json"
            doc = _read(f)
            if doc and doc.get("key") == key and doc.get("status") in ("ok", "incompatible"):
                pdocs[(i, j)] = doc
                reused += 1
                if on_pair:
                    on_pair(doc, True)
                continue
            todo[(i, j)] = (key, f)
            opts = {**popts, "fingerprints": {"base": b["fingerprint"], "target": t["fingerprint"]}}
            yield (i, j), (b["file"], t["file"], opts)

    new, timing = _collect_pairs(executor.map(tasks.pair_task, jobs()), usable, todo, on_pair)
    pdocs.update(new)
    universe = universe_study(cfg, usable, pairs, log) if cfg.universe else None
    run = {"executor": executor.name, "workers": executor.workers, "wall_s": time.perf_counter() - t0,
           "pairs_computed": len(todo), "pairs_reused": reused, **timing,
           "models_computed": len(files) - models_reused, "models_reused": models_reused,
           "pair_seconds": {f"{usable[i]['name']} <- {usable[j]['name']}": pdocs[(i, j)].get("wall_s")
                            for i, j in pairs if (i, j) in pdocs}}
    return summary.build_report(cfg, models, usable, [pdocs[p] for p in pairs if p in pdocs], universe, run)


# results are saved by a few threads: each file is fsync'ed (~5-10 ms on a local disk), which releases
# the GIL, so saves overlap each other and the wait for the next result instead of capping a large
# cluster at ~50 results/s
WRITERS = 8


def _save_pair(f: Path, doc: dict, align_doc: dict | None) -> tuple[dict, float]:
    t0 = time.perf_counter()
    if align_doc is not None:   # before the pair file: a pair marked done has its alignment
        _write(f.parent.parent / doc["result"]["alignment_file"], align_doc)
    _write(f, doc)
    return doc, time.perf_counter() - t0


def _collect_pairs(outcomes, usable, todo: dict, on_pair) -> tuple[dict, dict]:
    """Pair outcomes as they arrive, saved by WRITERS threads; on_pair(doc, False) runs in this
    thread once a pair is on disk (an exception there, Ctrl-C included, stops the study after the
    saves already started have finished). Returns ({(i, j): doc}, timings of the driver's share)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    docs, pending, driver_s, save_s = {}, set(), 0.0, 0.0

    def finish(futs):
        nonlocal save_s
        for fut in futs:
            pending.discard(fut)
            doc, dt = fut.result()
            save_s += dt
            if on_pair:
                on_pair(doc, False)

    with ThreadPoolExecutor(WRITERS, thread_name_prefix="hetmerge-zoo-save") as writers:
        for o in outcomes:
            ts = time.perf_counter()
            i, j = o.key
            key, f = todo[o.key]
            r = dict(o.result or {})
            doc = {"format": "hetmerge-zoo-pair", "key": key, "base": usable[i]["name"],
                   "target": usable[j]["name"], "status": r.pop("status", "failed") if o.ok else "failed",
                   "reason": r.pop("reason", o.error), "errors": o.errors, "attempts": o.attempts,
                   "wall_s": o.wall_s, "worker": o.worker, "timings": r.pop("timings", {}),
                   "traceback": o.traceback}
            align_doc = r.pop("alignment", None)
            if align_doc is not None:
                r["alignment_file"] = f"alignments/{f.name}"
            doc["result"] = r
            docs[o.key] = doc
            pending.add(writers.submit(_save_pair, f, doc, align_doc))
            driver_s += time.perf_counter() - ts
            finish([p for p in list(pending) if p.done()])
        while pending:
            finish(wait(pending, return_when=FIRST_COMPLETED)[0])
    return docs, {"driver_s": driver_s, "save_s": save_s, "writers": WRITERS}


def config_dict(cfg: ZooConfig) -> dict:
    d = asdict(cfg)
    d["zoo_dir"], d["out"] = str(cfg.zoo_dir), str(cfg.out)
    return d
