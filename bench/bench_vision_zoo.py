"""Coverage of real timm / torchvision CNNs: does hm.trace_spec follow them, and is the graph exact?

    python bench/bench_vision_zoo.py [--models resnet18,tv:densenet121,...] [--size 64] [--out table.md]

For each model, built without pretrained weights (BatchNorm statistics and affine parameters
randomized so that a wrongly permuted one shows): trace the permutation graph (with an example
input); plant a random permutation of every free group and check that the outputs do not change
(invariance: the graph is right); align the permuted copy back to the original with weight matching
and report the fraction of groups whose planted permutation was recovered exactly, the relative
output error of the merge at λ = 1 (0 when recovered), and the align time. A model that does not
trace gets its SpecError's first line. timm and torchvision are optional: a library that does not
import here is reported as such (this project's CPU environment cannot install torchvision; the
table in docs/vision.md was made on a machine that has both).
"""
from __future__ import annotations

import argparse
import copy
import signal
import sys
import time

import torch

TIMM = ["resnet18", "resnet50", "vgg11_bn", "mobilenetv3_small_100", "mobilenetv2_050", "efficientnet_b0",
        "densenet121", "convnext_atto", "regnetx_002", "resnext26ts", "ghostnet_100", "rexnet_100",
        "mnasnet_050", "dla34", "cspresnet50", "hrnet_w18_small"]
TORCHVISION = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
               "densenet121", "convnext_tiny", "regnet_x_400mf", "resnext50_32x4d", "squeezenet1_0",
               "shufflenet_v2_x0_5", "mnasnet0_5", "googlenet"]


def build(name: str):
    """(model, family label) for "timm:NAME" / "tv:NAME"."""
    lib, _, arch = name.partition(":")
    if lib == "timm":
        import timm
        return timm.create_model(arch, pretrained=False, num_classes=10)
    if lib == "tv":
        import torchvision
        kwargs = {"weights": None, "num_classes": 10}
        if arch == "googlenet":
            kwargs.update(aux_logits=False, init_weights=False)
        return getattr(torchvision.models, arch)(**kwargs)
    raise ValueError(f"model {name!r}: expected timm:NAME or tv:NAME")


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.dim() == 1:
                r = torch.randn(t.shape, generator=g)
                if name.endswith("running_var"):
                    t.copy_(r.abs() + 0.5)
                elif name.endswith("running_mean") or name.endswith("bias"):
                    t.copy_(0.2 * r)
                else:
                    t.copy_(1.0 + 0.2 * r)
    return model.eval()


class _Timeout(Exception):
    pass


def check(name: str, model: torch.nn.Module, x: torch.Tensor, max_iter: int, seconds: int) -> dict:
    """One coverage row (see the module docstring)."""
    import hetmerge as hm
    from hetmerge.maps import permute_state

    row = {"model": name, "params": sum(p.numel() for p in model.parameters())}

    def alarm(*_):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        t0 = time.perf_counter()
        try:
            spec = hm.trace_spec(model, example_input=x)
        except Exception as exc:  # noqa: BLE001 -- the row records why
            row.update(trace="no", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            return row
        row.update(trace="yes", groups=len(spec.sizes), trace_s=time.perf_counter() - t0)
        g = torch.Generator().manual_seed(1)
        perms = {grp: torch.randperm(n, generator=g) for grp, n in spec.sizes.items()}
        permuted = copy.deepcopy(model)
        permuted.load_state_dict(permute_state(spec, model.state_dict(), perms))
        with torch.no_grad():
            y = model(x)
            scale = float(y.abs().max()) or 1.0
            row["invariance_err"] = float((permuted(x) - y).abs().max()) / scale
            t0 = time.perf_counter()
            res = hm.align(model, permuted, max_iter=max_iter)
            row["align_s"] = time.perf_counter() - t0
            row["recovered"] = sum(torch.equal(res.maps[grp], torch.argsort(p)) for grp, p in perms.items()
                                   if grp in res.maps) / max(1, len(perms))
            row["merge_err"] = float((hm.merge(model, permuted, res, lam=1.0)(x) - y).abs().max()) / scale
    except _Timeout:
        row.setdefault("trace", "yes")
        row["reason"] = f"stopped after {seconds} s"
    except Exception as exc:  # noqa: BLE001
        row["reason"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return row


def table(rows: list[dict]) -> str:
    head = "| model | params | traces | groups | invariance err | recovered | λ=1 merge err | align s | note |"
    out = [head, "|" + "---|" * 9]
    for r in rows:
        def f(k, fmt):
            return fmt.format(r[k]) if k in r else "–"
        out.append(f"| {r['model']} | {r.get('params', 0) / 1e6:.1f}M | {r.get('trace', '–')} | {f('groups', '{}')} | "
                   f"{f('invariance_err', '{:.1e}')} | {f('recovered', '{:.0%}')} | {f('merge_err', '{:.1e}')} | "
                   f"{f('align_s', '{:.1f}')} | {r.get('reason', '')} |")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join([f"timm:{m}" for m in TIMM] + [f"tv:{m}" for m in TORCHVISION]))
    ap.add_argument("--size", type=int, default=64, help="input height = width")
    ap.add_argument("--max-iter", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=90, help="time limit per model")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()
    import hetmerge as hm
    print(f"torch {torch.__version__}, threads: torch {torch.get_num_threads()}, hetmerge {hm.get_num_threads()}")
    x = torch.randn(2, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    rows = []
    for name in args.models.split(","):
        try:
            model = randomize_norms(build(name))
        except ImportError as exc:
            rows.append({"model": name, "reason": f"not importable here ({exc})"})
            continue
        except Exception as exc:  # noqa: BLE001
            rows.append({"model": name, "reason": f"could not be built: {type(exc).__name__}: {exc}"})
            continue
        rows.append(check(name, model, x, args.max_iter, args.seconds))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print()
    print(text)
    traced = [r for r in rows if r.get("trace") == "yes"]
    exact = [r for r in traced if r.get("merge_err", 1) < 1e-4 and r.get("invariance_err", 1) < 1e-4]
    built = [r for r in rows if "trace" in r]
    print(f"\n{len(traced)}/{len(built)} built models trace; {len(exact)}/{len(built)} trace, are invariant and "
          f"merge back exactly at λ = 1")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
