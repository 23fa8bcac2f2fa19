"""mergejax's SOTA data-free merges next to FusionBench's own functions, on the same tensors: times and outputs.

An independent cross-check of mergejax's numpy references (``tests/reference_sota.py`` was written from the official
code; this runs the published code itself). The tensors are a ViT-shaped model in PyTorch orientation (a state dict of
``blocks.i.{qkv,out,fc1,fc2}.weight`` (out, in) and their biases, LayerNorm weights, and a ``token_embedding.weight``
(vocab, d)); mergejax gets the same numbers as a Flax tree (``kernel`` = weight^T, ``embedding`` as is), so its
orientation rule (Flax kernels transposed, embeddings not) is checked too. Fine-tuned = base + 0.01 N(0, 1).

FusionBench (pip ``fusion-bench==0.2.33``, in the peers venv of ``experiments/peers/setup_venv.sh``) runs in a child
process with ``--peers-python``; without it the comparison is skipped with a message. Compared, each on the task
vectors tau_t = theta_t - theta_0 (``scale`` 1 everywhere, FusionBench's merged task vector vs mergejax's
merged - base):

==============  ======================================================  =============================================
mergejax        FusionBench 0.2.33                                      what is compared
==============  ======================================================  =============================================
tsv             task_singular_vector.utils.TSVM_utils                   merged task vector
                .compute_and_sum_svd_mem_reduction
iso_c           isotropic_merging.iso_utils.iso_c                       merged task vector
iso_cts         isotropic_merging.iso_utils.iso_cts (fraction 0.8)      merged task vector
wudi            wudi.wudi.wudi_merging (Adam lr 1e-5, ``--wudi-steps``)  merged task vector, and its displacement
                                                                        from the starting point sum_t tau_t
emr             emr_merging.utils.emr_merge                             unified vector, masks, rescalers, task 0's
                                                                        task vector
tall_masks      tall_mask.utils.generate_task_masks (lambda 0.6)        fraction of differing mask entries (also
                                                                        against TallMaskTaskArithmeticAlgorithm's
                                                                        masks, which compare |theta_0 - tau_t|, not
                                                                        |tau_t|, with lambda |tau_MTL - tau_t|)
consensus_ta    the same masks, count >= 2 (tall_masks'                 merged task vector
                construct_consensus_mask rule), times sum_t tau_t
model_stock     model_stock.model_stock.compute_angle, compute_ratio,   merged task vector (T = 2: FusionBench's
                merge_weights                                           function merges two models)
==============  ======================================================  =============================================

Differences reported: ``rel_fro`` = max over leaves of ||ours - theirs||_F / ||theirs||_F and ``rel_max`` = max over
leaves of max|ours - theirs| / max|theirs|. Times: FusionBench's function once (eager torch, its ``print``s silenced),
mergejax's jitted call first (compile + run) and best of ``--repeats`` later calls; ``OPENBLAS_NUM_THREADS=1`` on both
sides unless set (see ``experiments/bench_sota.py``).

Usage::

    bash experiments/peers/setup_venv.sh /tmp/peers-venv
    python experiments/peers/fusionbench_sota.py --peers-python /tmp/peers-venv/bin/python
    python experiments/peers/fusionbench_sota.py --peers-python /tmp/peers-venv/bin/python --width 768 --blocks 1
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

LAM, COMMON_FRACTION = 0.6, 0.8


# ----------------------------------------------------------------------------------------------------------- tensors
def make_state_dicts(width: int, blocks: int, vocab: int, n_tasks: int, seed: int) -> list[dict[str, np.ndarray]]:
    """[base, ft_1..ft_T] as PyTorch-oriented float32 state dicts (numpy)."""
    rng = np.random.default_rng(seed)
    d = width
    shapes = {"token_embedding.weight": (vocab, d)}
    for i in range(blocks):
        p = f"blocks.{i}."
        shapes.update({p + "qkv.weight": (3 * d, d), p + "qkv.bias": (3 * d,), p + "out.weight": (d, d),
                       p + "out.bias": (d,), p + "fc1.weight": (4 * d, d), p + "fc1.bias": (4 * d,),
                       p + "fc2.weight": (d, 4 * d), p + "fc2.bias": (d,), p + "ln1.weight": (d,),
                       p + "ln2.weight": (d,)})
    base = {k: (0.02 * rng.standard_normal(s, np.float32) + (1.0 if k.endswith("ln1.weight") or
                                                              k.endswith("ln2.weight") else 0.0)).astype(np.float32)
            for k, s in shapes.items()}
    fts = [{k: v + np.float32(0.01) * rng.standard_normal(v.shape, np.float32) for k, v in base.items()}
           for _ in range(n_tasks)]
    return [base, *fts]


def save_state_dicts(path: str, sds: list[dict[str, np.ndarray]]) -> None:
    """[base, ft_1..ft_T] into one npz (keys ``m{i}/{name}``), for a FusionBench child (``--load``)."""
    np.savez(path, **{f"m{i}/{k}": v for i, sd in enumerate(sds) for k, v in sd.items()})


def load_state_dicts(path: str) -> list[dict[str, np.ndarray]]:
    """The inverse of :func:`save_state_dicts` (key order kept)."""
    data = np.load(path)
    sds: list[dict[str, np.ndarray]] = []
    for name in data.files:
        i, k = name.split("/", 1)
        while len(sds) <= int(i[1:]):
            sds.append({})
        sds[int(i[1:])][k] = data[name]
    return sds


def to_flax(sd: dict[str, np.ndarray]) -> dict:
    """A state dict as a Flax tree: ``*.weight`` of Linear layers -> ``kernel`` (transposed), embeddings as they are,
    LayerNorm ``weight`` -> ``scale``."""
    tree: dict = {}
    for k, v in sd.items():
        *mods, leaf = k.split(".")
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        if mods[-1] == "token_embedding":
            node["embedding"] = v
        elif mods[-1].startswith("ln"):
            node["scale"] = v
        elif leaf == "weight":
            node["kernel"] = np.ascontiguousarray(v.T)
        else:
            node[leaf] = v
    return tree


def from_flax(tree: dict, keys: list[str]) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_flax` for the state-dict ``keys``."""
    out = {}
    for k in keys:
        *mods, leaf = k.split(".")
        node = tree
        for m in mods:
            node = node[m]
        if mods[-1] == "token_embedding":
            out[k] = np.asarray(node["embedding"])
        elif mods[-1].startswith("ln"):
            out[k] = np.asarray(node["scale"])
        elif leaf == "weight":
            out[k] = np.asarray(node["kernel"]).T
        else:
            out[k] = np.asarray(node[leaf])
    return out


# ------------------------------------------------------------------------------------------------ FusionBench child
PEER_METHODS = ("tsv", "iso_c", "iso_cts", "emr", "tall_masks", "model_stock", "wudi")


def run_fusionbench(sds: list[dict[str, np.ndarray]], wudi_steps: int, only: set[str] | None = None
                    ) -> tuple[dict[str, np.ndarray], dict]:
    """In the peers venv: FusionBench's functions on the task vectors; (outputs keyed "method/param", info).

    Args:
      sds: [base, ft_1..ft_T] PyTorch-oriented state dicts.
      wudi_steps: WUDI's Adam steps.
      only: run just these of :data:`PEER_METHODS` (default: all).
    """
    want = lambda name: only is None or name in only  # noqa: E731
    import torch

    torch.manual_seed(0)
    base = {k: torch.from_numpy(v) for k, v in sds[0].items()}
    fts = [{k: torch.from_numpy(v) for k, v in sd.items()} for sd in sds[1:]]
    tvs = [{k: ft[k] - base[k] for k in base} for ft in fts]
    outs: dict[str, np.ndarray] = {}
    info: dict = {"fusion_bench": None, "torch": torch.__version__, "threads": torch.get_num_threads(), "times": {},
                  "errors": {}}

    def timed(name, fn):
        try:
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                res = fn()
            info["times"][name] = time.perf_counter() - t
            return res
        except Exception as e:  # noqa: BLE001 - reported, never fatal
            info["errors"][name] = f"{type(e).__name__}: {e}"[:300]
            return None

    def put(name, sd):
        if sd is not None:
            for k, v in sd.items():
                outs[f"{name}/{k}"] = v.detach().to(torch.float32).numpy()

    import importlib.metadata as md

    info["fusion_bench"] = md.version("fusion-bench")
    with torch.no_grad():
        from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
        from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

        if want("tsv"):
            put("tsv", timed("tsv", lambda: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")))
        if want("iso_c"):
            put("iso_c", timed("iso_c", lambda: iso_c(tvs, accelerator="cpu")))
        if want("iso_cts"):
            put("iso_cts", timed("iso_cts", lambda: iso_cts(tvs, COMMON_FRACTION, accelerator="cpu")))

        from fusion_bench.method.emr_merging.utils import emr_merge

        res = timed("emr", lambda: emr_merge(tvs)) if want("emr") else None
        if res is not None:
            uni, masks, rescalers = res
            put("emr_unified", uni)
            for t in range(len(tvs)):
                put(f"emr_mask{t}", {k: m[t].to(torch.float32) for k, m in masks.items()})
            put("emr_task0", {k: uni[k] * masks[k][0] * rescalers[0] for k in uni})
            outs["emr_rescalers/all"] = rescalers.numpy()

        from fusion_bench.method.tall_mask.utils import generate_task_masks

        keys = list(base)
        flat = lambda sd: torch.cat([sd[k].reshape(-1) for k in keys])  # noqa: E731
        if want("tall_masks"):
            flat_tvs = torch.stack([flat(tv) for tv in tvs])
            flat_fts = torch.stack([flat(ft) for ft in fts])
        masks = None
        if want("tall_masks"):
            masks = timed("tall_masks", lambda: generate_task_masks(flat_tvs, flat_fts, flat(base),
                                                                    tall_mask_lambda=LAM))
        if masks is not None:
            outs["tall_masks/all"] = masks.numpy()
            consensus = masks.float().sum(0) >= 2  # tall_masks' construct_consensus_mask with prun_thre_k = 2
            outs["consensus_ta/flat"] = (consensus * flat_tvs.sum(0)).numpy()
        from fusion_bench.method.tall_mask.task_arithmetic import generate_task_masks as algorithm_masks

        mtl = {k: sum(tv[k] for tv in tvs) for k in keys}  # as TallMaskTaskArithmeticAlgorithm.run calls it
        algo = timed("tall_masks_algorithm", lambda: [algorithm_masks(mtl, tv, base, tall_mask_lambda=LAM)
                                                      for tv in tvs]) if want("tall_masks") else None
        if algo is not None:
            outs["tall_masks_algorithm/all"] = torch.stack([flat(m) for m in algo]).numpy() > 0.5

        from fusion_bench.method.model_stock.model_stock import compute_angle, compute_ratio, merge_weights

        def model_stock():
            ratio = compute_ratio(compute_angle(fts[0], fts[1], base), k=2)
            merged = merge_weights(fts[0], fts[1], base, ratio)
            return {k: merged[k] - base[k] for k in base}

        put("model_stock", timed("model_stock", model_stock) if len(fts) >= 2 and want("model_stock") else None)

        from fusion_bench.method.wudi.wudi import wudi_merging

        def wudi():
            with torch.enable_grad():
                merged = wudi_merging(tvs, accelerator="cpu", iter_num=wudi_steps)
            return {k: v.detach() for k, v in merged.items()}

        if want("wudi"):
            put("wudi", timed("wudi", wudi))
    return outs, info


# --------------------------------------------------------------------------------------------------- mergejax side
def run_mergejax(sds: list[dict[str, np.ndarray]], wudi_steps: int, repeats: int) -> tuple[dict, dict]:
    """mergejax's methods on the Flax trees; (outputs keyed like FusionBench's, times)."""
    import jax
    import jax.numpy as jnp

    import mergejax as mj

    keys = list(sds[0])
    base = jax.device_put(to_flax(sds[0]))
    fts = [jax.device_put(to_flax(sd)) for sd in sds[1:]]
    T = len(fts)
    fns = {
        "tsv": lambda b, f: mj.tsv(b, f, scale=1.0, check_finite=False),
        "iso_c": lambda b, f: mj.iso_c(b, f, scale=1.0, check_finite=False),
        "iso_cts": lambda b, f: mj.iso_cts(b, f, common_fraction=COMMON_FRACTION, scale=1.0, check_finite=False),
        "wudi": lambda b, f: mj.wudi(b, f, steps=wudi_steps, lr=1e-5, progress=False, check_finite=False),
        "consensus_ta": lambda b, f: mj.consensus_ta(b, f, lam=LAM, k=2, scale=1.0, check_finite=False),
    }
    if T >= 2:
        fns["model_stock"] = lambda b, f: mj.model_stock(b, f[:2], check_finite=False)
    outs, times = {}, {}

    def tv_of(merged):
        return from_flax(jax.tree.map(lambda m, b: np.asarray(m, np.float32) - np.asarray(b, np.float32),
                                      merged, base), keys)

    for name, fn in fns.items():
        jitted = jax.jit(fn)
        t = time.perf_counter()
        merged = jax.block_until_ready(jitted(base, fts))
        first = time.perf_counter() - t
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(jitted(base, fts))
            best = min(best, time.perf_counter() - t)
        times[name] = {"first_s": first, "best_s": best}
        for k, v in tv_of(merged).items():
            outs[f"{name}/{k}"] = v

    def emr_all():
        res = mj.emr(base, fts, check_finite=False)
        return res, [jax.block_until_ready(res.task_vector(0))]

    t = time.perf_counter()
    res, _ = emr_all()
    first = time.perf_counter() - t
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        emr_all()
        best = min(best, time.perf_counter() - t)
    times["emr"] = {"first_s": first, "best_s": best}
    # the float leaves of EMRMerged follow the flattening order of the base tree
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
    from mergejax.ternary.device import unpack_bits

    def as_sd(leaves):
        tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(base), [np.asarray(x) for x in leaves])
        return from_flax(tree, keys)

    assert len(paths) == len(res.unified)
    for k, v in as_sd(res.unified).items():
        outs[f"emr_unified/{k}"] = v
    for t_ in range(T):
        for k, v in as_sd([unpack_bits(w, s) for w, s in zip(res.masks[t_], res._shapes)]).items():
            outs[f"emr_mask{t_}/{k}"] = v.astype(np.float32)
    for k, v in as_sd(res.task_vector(0)).items():
        outs[f"emr_task0/{k}"] = v
    outs["emr_rescalers/all"] = np.asarray(res.rescalers)

    tm = mj.tall_masks(base, fts, lam=LAM)
    t = time.perf_counter()
    tm = mj.tall_masks(base, fts, lam=LAM)
    jax.block_until_ready(tm.masks)
    times["tall_masks"] = {"first_s": None, "best_s": time.perf_counter() - t}
    outs["tall_masks/all"] = np.stack([
        np.concatenate([v.reshape(-1) for v in as_sd(jax.tree.leaves(m)).values()]) for m in tm.masks])
    outs["consensus_ta/flat"] = np.concatenate([outs[f"consensus_ta/{k}"].reshape(-1) for k in keys])
    del jnp
    return outs, times


# ------------------------------------------------------------------------------------------------------ comparison
def rel_diffs(ours: dict, theirs: dict, prefix: str) -> dict[str, float] | None:
    """Max over the leaves under ``prefix`` of the relative Frobenius and max-abs differences."""
    names = [k for k in theirs if k.startswith(prefix + "/")]
    if not names:
        return None
    fro = mx = 0.0
    worst = None
    for k in names:
        a, b = np.asarray(ours[k], np.float64), np.asarray(theirs[k], np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{k}: mergejax shape {a.shape} vs FusionBench {b.shape}")
        nb, mb = np.linalg.norm(b), np.max(np.abs(b), initial=0.0)
        f = np.linalg.norm(a - b) / nb if nb > 0 else float(np.linalg.norm(a))
        m = np.max(np.abs(a - b), initial=0.0) / mb if mb > 0 else float(np.max(np.abs(a), initial=0.0))
        if f > fro:
            fro, worst = f, k
        mx = max(mx, m)
    return {"rel_fro": fro, "rel_max": mx, "worst_leaf": worst}


def compare(ours: dict, theirs: dict, sds: list[dict], info: dict, times: dict) -> list[dict]:
    rows = []
    keys = list(sds[0])

    def row(method, fb_prefix, what, diff=None, fb_time=None):
        d = diff if diff is not None else rel_diffs(ours, theirs, fb_prefix)
        t = times.get(method, {})
        fb_t = info["times"].get(fb_time or method)
        rows.append({"method": method, "compared": what, **(d or {"error": info["errors"].get(fb_time or method)}),
                     "fusionbench_s": fb_t, "mergejax_first_s": t.get("first_s"), "mergejax_best_s": t.get("best_s"),
                     "speedup": fb_t / t["best_s"] if fb_t and t.get("best_s") else None})

    for m in ("tsv", "iso_c", "iso_cts"):
        row(m, m, "merged task vector")
    row("wudi", "wudi", f"merged task vector ({info.get('wudi_steps')} Adam steps)")
    if "wudi/" + keys[0] in theirs:
        start = {k: sum(sd[k] - sds[0][k] for sd in sds[1:]) for k in keys}
        mats = [k for k in keys if sds[0][k].ndim == 2]
        disp_o = {f"d/{k}": ours[f"wudi/{k}"] - start[k] for k in mats}
        disp_t = {f"d/{k}": theirs[f"wudi/{k}"] - start[k] for k in mats}
        rows.append({"method": "wudi", "compared": "displacement from sum_t tau_t (matrices)",
                     **rel_diffs(disp_o, disp_t, "d")})
    row("emr", "emr_unified", "unified vector")
    if "emr_rescalers/all" in theirs:
        a, b = ours["emr_rescalers/all"], theirs["emr_rescalers/all"]
        rows.append({"method": "emr", "compared": "rescalers",
                     "rel_fro": float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                     "rel_max": float(np.max(np.abs(a - b)) / np.max(np.abs(b))), "worst_leaf": None})
        T = len(sds) - 1
        diff = sum(float(np.sum(ours[k] != theirs[k])) for t in range(T) for k in theirs if k.startswith(f"emr_mask{t}/"))
        total = sum(theirs[k].size for t in range(T) for k in theirs if k.startswith(f"emr_mask{t}/"))
        rows.append({"method": "emr", "compared": "masks: fraction of differing entries", "rel_fro": diff / total,
                     "rel_max": None, "worst_leaf": None})
        row("emr", "emr_task0", "task 0's task vector")
    if "tall_masks/all" in theirs:
        a, b = ours["tall_masks/all"], theirs["tall_masks/all"]
        frac = float(np.mean(a != b))
        t = times.get("tall_masks", {})
        fb_t = info["times"].get("tall_masks")
        rows.append({"method": "tall_masks", "compared": "masks: fraction of differing entries", "rel_fro": frac,
                     "rel_max": None, "worst_leaf": None, "fusionbench_s": fb_t, "mergejax_best_s": t.get("best_s"),
                     "speedup": fb_t / t["best_s"] if fb_t and t.get("best_s") else None})
        if "tall_masks_algorithm/all" in theirs:
            frac = float(np.mean(ours["tall_masks/all"] != theirs["tall_masks_algorithm/all"]))
            rows.append({"method": "tall_masks", "compared": "vs TallMaskTaskArithmeticAlgorithm's masks",
                         "rel_fro": frac, "rel_max": None, "worst_leaf": None})
        d = rel_diffs({"c/flat": ours["consensus_ta/flat"]}, {"c/flat": theirs["consensus_ta/flat"]}, "c")
        row("consensus_ta", None, "merged task vector (flattened)", diff=d, fb_time="tall_masks")
    if any(k.startswith("model_stock/") for k in theirs):
        row("model_stock", "model_stock", "merged task vector (first 2 models)")
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'method':<13}{'compared':<45}{'rel_fro':>10}{'rel_max':>10}  {'FB s':>8}{'mj first':>9}{'mj best':>9}"
          f"{'FB/mj':>8}")
    f = lambda x, s: "" if x is None else format(x, s)  # noqa: E731
    for r in rows:
        print(f"{r['method']:<13}{r['compared'][:44]:<45}{f(r.get('rel_fro'), '.2e'):>10}{f(r.get('rel_max'), '.2e'):>10}"
              f"  {f(r.get('fusionbench_s'), '.3f'):>8}{f(r.get('mergejax_first_s'), '.2f'):>9}"
              f"{f(r.get('mergejax_best_s'), '.3f'):>9}{f(r.get('speedup'), '.1f'):>8}"
              + (f"  ERROR {r['error']}" if r.get("error") else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers-python", help="interpreter of the peers venv with fusion-bench (setup_venv.sh)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--wudi-steps", type=int, default=30, help="official: 300 (FusionBench's config: 400)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/fusionbench_sota.json")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--load", help=argparse.SUPPRESS)  # child: state dicts from an npz of save_state_dicts
    ap.add_argument("--only", nargs="+", choices=PEER_METHODS, help=argparse.SUPPRESS)  # child: these methods
    args = ap.parse_args()
    if args.load:
        sds = load_state_dicts(args.load)
    else:
        sds = make_state_dicts(args.width, args.blocks, args.vocab, args.tasks, args.seed)
    if args.child:
        outs, info = run_fusionbench(sds, args.wudi_steps, set(args.only) if args.only else None)
        np.savez(args.child[0], **outs)
        Path(args.child[1]).write_text(json.dumps(info))
        return
    if not args.peers_python:
        print("no --peers-python given: FusionBench is skipped (make its venv with experiments/peers/setup_venv.sh, "
              "then pass --peers-python VENV/bin/python)")
        return
    n = sum(v.size for v in sds[0].values())
    print(f"{n / 1e6:.2f}M parameters (width {args.width}, {args.blocks} blocks, vocab {args.vocab}), T = {args.tasks}")
    with tempfile.TemporaryDirectory() as tmp:
        o, i = Path(tmp) / "fb.npz", Path(tmp) / "fb.json"
        cmd = [args.peers_python, __file__, "--child", str(o), str(i), "--width", str(args.width), "--blocks",
               str(args.blocks), "--vocab", str(args.vocab), "--tasks", str(args.tasks), "--wudi-steps",
               str(args.wudi_steps), "--seed", str(args.seed)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print("the FusionBench run failed:", "\n".join(res.stderr.strip().splitlines()[-5:]))
            sys.exit(1)
        theirs = dict(np.load(o))
        info = json.loads(i.read_text())
    info["wudi_steps"] = args.wudi_steps
    ours, times = run_mergejax(sds, args.wudi_steps, args.repeats)
    rows = compare(ours, theirs, sds, info, times)
    print(f"FusionBench {info['fusion_bench']} (torch {info['torch']}, {info['threads']} threads) vs mergejax")
    print_rows(rows)
    for k, e in info["errors"].items():
        print(f"FusionBench {k}: not run ({e})")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"}, "params": n,
                               "fusionbench": info, "mergejax_times": times, "rows": rows}, indent=1, default=float))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
