"""TIES-merge sharded models on every host of a TPU pod (or locally on fake CPU devices with --demo) and save with orbax.

The same script runs on every host (``tpu/launch.sh`` starts it with ``--worker=all``). Each host:
  1. joins ``jax.distributed`` (on a TPU VM no arguments are needed: JAX detects the pod);
  2. builds one mesh over *all* devices of all hosts, and NamedShardings from path rules (or ``default_rules``);
  3. restores the base and fine-tuned checkpoints from orbax onto those shardings (each host reads only its shards),
     or, without ``--base``, generates synthetic parameters on device, shard by shard;
  4. runs ``mergejax.ties`` — one jitted program per host, no parameter crosses devices;
  5. saves the merged tree with orbax's ``StandardCheckpointer`` from all hosts together (each host writes its own
     shards, process 0 the metadata; the directory must be shared by all hosts, e.g. ``gs://bucket/path``).

Local run (single process, 8 fake CPU devices), synthetic models, then the same from orbax checkpoints::

    python tpu/merge_pod.py --demo --out /tmp/mergejax_pod_demo
    python tpu/merge_pod.py --demo --write-inputs /tmp/mergejax_pod_inputs
    python tpu/merge_pod.py --demo --out /tmp/mergejax_pod_demo --base /tmp/mergejax_pod_inputs/base \\
        --finetuned /tmp/mergejax_pod_inputs/ft_0 /tmp/mergejax_pod_inputs/ft_1 /tmp/mergejax_pod_inputs/ft_2

On a pod::

    tpu/launch.sh my-tpu us-central2-b "python tpu/merge_pod.py --out gs://my-bucket/merged \\
        --base gs://my-bucket/base --finetuned gs://my-bucket/ft_a gs://my-bucket/ft_b"
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", action="store_true", help="one local process on fake CPU devices (no TPU needed)")
    p.add_argument("--demo-devices", type=int, default=8, help="fake CPU devices in --demo mode")
    p.add_argument("--out", default=None, help="directory for the merged checkpoint (shared by all hosts on a pod)")
    p.add_argument("--base", help="orbax checkpoint of the pre-trained model (synthetic parameters if omitted)")
    p.add_argument("--finetuned", nargs="*", default=[], help="orbax checkpoints of the fine-tuned models")
    p.add_argument("--num-tasks", type=int, default=3, help="synthetic fine-tuned models when --base is omitted")
    p.add_argument("--width", type=int, default=512, help="hidden width of the synthetic model")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic model")
    p.add_argument("--density", type=float, default=0.2, help="TIES k (fraction of each task vector kept)")
    p.add_argument("--scale", type=float, default=1.0, help="TIES lambda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write-inputs", metavar="DIR", help="save the input models under DIR (base, ft_0, ...) and stop")
    args = p.parse_args(argv)
    if args.out is None and args.write_inputs is None:
        p.error("--out is required")
    if args.base is None and args.finetuned:
        p.error("--finetuned needs --base")
    if args.base is not None and not args.finetuned:
        p.error("--base needs at least one --finetuned checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.demo:  # before JAX starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.demo_devices}"
        ).strip()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import PartitionSpec as P

    import mergejax as mj
    from mergejax import sharding as shd

    if not args.demo:
        shd.initialize_distributed()  # TPU pods: everything auto-detected
    log = print if shd.is_primary() else (lambda *a, **k: None)
    log(f"processes {jax.process_count()}, devices {jax.device_count()} ({jax.devices()[0].platform}), "
        f"local devices {jax.local_device_count()}")

    mesh = shd.make_mesh()  # all devices of all hosts on one axis "data"
    # Row-sharded matrices, column-sharded output projections; biases and norms replicated.
    rules = [(r"(^|/)(up|qkv)/kernel$", P(None, "data")), (r"(^|/)(down|out)/kernel$", P("data")),
             (r"embedding$", P("data"))]

    def synthetic(key: jax.Array) -> dict:
        w, k = args.width, iter(jax.random.split(key, 5 * args.layers + 1))
        layers = {
            f"layers_{i}": {
                "qkv": {"kernel": jax.random.normal(next(k), (w, 3 * w)) * w**-0.5},
                "out": {"kernel": jax.random.normal(next(k), (w, w)) * w**-0.5},
                "up": {"kernel": jax.random.normal(next(k), (w, 4 * w)) * w**-0.5},
                "down": {"kernel": jax.random.normal(next(k), (4 * w, w)) * (4 * w) ** -0.5,
                         "bias": jax.random.normal(next(k), (w,)) * 0.01},
            }
            for i in range(args.layers)
        }
        return {"embedding": jax.random.normal(next(k), (1024, w)).astype(jnp.bfloat16), **layers}

    def path_of(p: str) -> str:
        return p if "://" in p else os.path.abspath(p)

    ckpt = ocp.StandardCheckpointer()
    t0 = time.perf_counter()
    if args.base is None:
        # Generated on device, each device only its own shard (threefry is partitionable): nothing the size of the
        # model ever sits on one host. Fine-tuned = base + a small task-specific delta.
        abstract = jax.eval_shape(synthetic, jax.random.key(0))
        shardings = shd.shard_rules(abstract, rules, mesh, on_mismatch="replicate")
        make = jax.jit(synthetic, out_shardings=shardings)
        perturb = jax.jit(
            lambda b, key: jax.tree.map(lambda x, n: (x + 0.02 * n.astype(x.dtype)), b, synthetic(key)),
            out_shardings=shardings,
        )
        base = make(jax.random.key(args.seed))
        finetuned = [perturb(base, jax.random.key(args.seed + 1 + t)) for t in range(args.num_tasks)]
    else:
        # Shapes and dtypes from the checkpoint's metadata; each host reads only the shards its devices hold.
        meta = ckpt.metadata(path_of(args.base)).item_metadata
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), getattr(meta, "tree", meta))
        shardings = shd.shard_rules(abstract, rules, mesh, on_mismatch="replicate")
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        base = ckpt.restore(path_of(args.base), target)
        finetuned = [ckpt.restore(path_of(f), target) for f in args.finetuned]
    if args.write_inputs:  # save the models (e.g. the synthetic ones) as orbax checkpoints and stop
        for name, tree in [("base", base)] + [(f"ft_{t}", ft) for t, ft in enumerate(finetuned)]:
            ckpt.save(os.path.join(path_of(args.write_inputs), name), tree, force=True)
        ckpt.wait_until_finished()
        log(f"wrote base and {len(finetuned)} fine-tuned checkpoints under {args.write_inputs}")
        return 0
    jax.block_until_ready((base, finetuned))
    n_params = sum(x.size for x in jax.tree.leaves(base))
    log(f"loaded {1 + len(finetuned)} models of {n_params / 1e6:.1f}M parameters in {time.perf_counter() - t0:.2f} s")

    t0 = time.perf_counter()
    merged = mj.ties(base, finetuned, density=args.density, scale=args.scale)
    jax.block_until_ready(merged)
    log(f"TIES (density {args.density}, scale {args.scale}) in {time.perf_counter() - t0:.2f} s (incl. compile)")
    for (path, x), (_, s) in zip(mj.tree.paths_and_leaves(merged), mj.tree.paths_and_leaves(shardings)):
        if not x.sharding.is_equivalent_to(s, x.ndim):
            raise RuntimeError(f"merged leaf {path!r} lost its sharding: {x.sharding} instead of {s}")

    out = path_of(args.out)
    t0 = time.perf_counter()
    ckpt.save(os.path.join(out, "merged"), merged, force=True)  # every host writes its shards; process 0 commits
    ckpt.wait_until_finished()
    log(f"saved to {os.path.join(out, 'merged')} in {time.perf_counter() - t0:.2f} s")

    if args.demo:  # read it back onto the same shardings and compare
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), merged)
        back = ckpt.restore(os.path.join(out, "merged"), target)
        for (path, a), (_, b) in zip(mj.tree.paths_and_leaves(merged), mj.tree.paths_and_leaves(back)):
            if not (np.array_equal(np.asarray(a), np.asarray(b)) and a.sharding.is_equivalent_to(b.sharding, a.ndim)):
                raise RuntimeError(f"restored leaf {path!r} differs from the merged one")
        changed = sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base)))
        spec = merged["layers_0"]["qkv"]["kernel"].sharding.spec
        log(f"restored and verified; layers_0/qkv/kernel sharded as {spec}; {changed / n_params:.1%} of all entries changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
