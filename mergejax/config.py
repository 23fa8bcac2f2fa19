"""mergekit-compatible merge configurations: read mergekit's YAML and produce the tensors mergekit would.

``python -m mergejax merge CONFIG.yaml OUT`` (like ``mergekit-yaml CONFIG OUT``) or, from Python,
:func:`run_config` (streaming, tensor by tensor, to a sharded safetensors directory) and :func:`merge_in_memory`
(a dict of arrays in, a dict of arrays out; on a mesh the arrays may be sharded ``jax.Array`` s).

Supported YAML (mergekit 0.1.5)::

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties
    base_model: ./base            # local directories, relative to the working directory
    models:
      - model: ./ft_a
        parameters: {weight: 1.0, density: 0.5}   # per model; may also be given once under the top-level `parameters`
    parameters: {normalize: true, int8_mask: true, lambda: 1.0, rescale: false}
    dtype: float32                 # inputs are cast to it on load, as mergekit does; out_dtype optional

Every mergekit method here is **per tensor** (mergekit's generalized task arithmetic), so a config streams whatever
the model size: coordinatewise configs (linear, task_arithmetic, and any method whose models are not sparsified)
over flat chunks that join small tensors and cut large ones (:func:`merge_chunk`, mergejax.stream's chunked
engine); TIES and Breadcrumbs (per-tensor top-k and bands) with each tensor larger than one chunk over its own
chunks, after two exact histogram passes over it give every model's threshold (:func:`tensor_bands`), the smaller
ones whole; DARE (masks drawn per tensor) and the L1 rescale one whole tensor at a time. mergekit's semantics, followed here (they differ from the papers, and from
``mergejax.ties`` / ``mergejax.dare`` whose defaults follow the papers):

- sparsification per tensor, each model with its own density: ``magnitude`` keeps the top k = max(1, int(d * n))
  entries by |delta| (TIES), ``random`` keeps each entry with probability d (DARE) and, with ``rescale`` (default for
  dare_*), rescales the tensor to keep its L1 norm (not 1/d); ``magnitude_outliers`` (Breadcrumbs) keeps the
  descending-rank band [min(int(gamma n), n - int(d n)), + int(d n)) of the flattened tensor (not per row);
- the deltas are multiplied by their weights *before* the sign election: sign = +1 where sum_i w_i delta_i >= 0
  (zero sums go to +, not to the global majority); an entry is kept where sgn(w_i delta_i) equals it;
- ``normalize`` divides by the sum of the weights of the kept entries (1 where none), or without a consensus by
  sum_i w_i (1 where |sum| < 1e-8); then ``lambda`` scales; theta = base + mixed delta;
- ``linear`` is sum_i w_i theta_i / sum_i w_i (``normalize: true`` by default) over the listed models.

The operator (:func:`merge_tensor`) is written per tensor on mergejax's exact selection and sign primitives rather
than as a chain of the paper-faithful stages, because mergekit's rounding (k = max(1, int(d n)) on the float product),
its density >= 1 shortcut, its zero-sum rule and its rescale epsilon all differ from them in edge cases.

Differences that remain: mergejax accumulates in float32 whatever ``dtype`` says (mergekit computes in ``dtype``, so
with bfloat16 its deltas are rounded to bfloat16 first); magnitude ties keep every entry tied at the threshold
(mergekit's argsort keeps exactly k, by position); DARE's masks come from ``jax.random`` (threefry) keyed by
``seed`` and the tensor's name, not from torch's generator, so dare_* results agree with mergekit in distribution
only; ``int8_mask`` changes only mergekit's mask storage and has no numerical effect here.
Refused with an error naming them: ``slices``, ``modules``, tokenizer surgery (``tokenizer``, ``tokenizer_source``,
``chat_template``), gradient (list) and filtered parameter values, LoRA model references, unknown methods and keys.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mergejax.ops.select import kth_largest_magnitude
from mergejax.ops.sign import sign_mass

__all__ = [
    "METHODS",
    "ModelSpec",
    "MergeConfig",
    "load_config",
    "parse_config",
    "merge_tensor",
    "coordinatewise",
    "merge_chunk",
    "band_chunked",
    "tensor_bands",
    "merge_in_memory",
    "run_config",
    "main",
]

# method -> (consensus, sparsification, default normalize, default rescale), as mergekit's registry
_GTA = {
    "task_arithmetic": (None, None, False, False),
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "magnitude_outliers", False, False),
    "breadcrumbs_ties": ("sum", "magnitude_outliers", False, False),
}
METHODS = ("linear", *_GTA)

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype"}
_REFUSED_KEYS = {"slices", "modules", "tokenizer", "tokenizer_source", "chat_template"}
_SHARED = {"normalize", "int8_mask", "lambda", "rescale"}
_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One input model and its resolved per-model parameters."""

    path: str
    weight: float
    density: float = 1.0
    gamma: float = 0.01


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """A parsed mergekit configuration (hashable: it is the static part of the jitted per-tensor merge).

    Attributes:
      method: one of :data:`METHODS`.
      base_model: base checkpoint directory (None for ``linear`` without one).
      models: the non-base inputs, with weights, densities and gammas resolved (model > top-level > default).
      normalize, rescale, lambda_, int8_mask: mergekit's shared parameters (defaults per method).
      dtype: inputs are cast to it when read (mergekit's ``dtype``); out_dtype: of the written tensors.
    """

    method: str
    base_model: str | None
    models: tuple[ModelSpec, ...]
    normalize: bool
    rescale: bool = False
    lambda_: float = 1.0
    int8_mask: bool = False
    dtype: str | None = None
    out_dtype: str | None = None

    @property
    def consensus(self) -> str | None:
        return None if self.method == "linear" else _GTA[self.method][0]

    @property
    def sparsification(self) -> str | None:
        return None if self.method == "linear" else _GTA[self.method][1]

    @property
    def needs_key(self) -> bool:
        return self.sparsification == "random" and any(m.density < 1 for m in self.models)

    def resolve(self, root: str | os.PathLike[str] = ".") -> "MergeConfig":
        """The same config with model paths made absolute against ``root`` (mergekit resolves against the cwd)."""
        fix = lambda p: None if p is None else str((Path(root) / p).resolve())  # noqa: E731
        models = tuple(dataclasses.replace(m, path=fix(m.path)) for m in self.models)
        return dataclasses.replace(self, base_model=fix(self.base_model), models=models)


def _scalar(value: Any, name: str, where: str, kind: type) -> Any:
    if isinstance(value, (list, dict)):
        raise ValueError(
            f"{where}: parameter {name!r} = {value!r}: gradient (list) and filtered parameter values are not supported"
        )
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: parameter {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: parameter {name!r} must be a number, got {value!r}")
    return float(value)


def _model_path(entry: Any, where: str) -> str:
    path = entry if isinstance(entry, str) else None
    if path is None:
        raise ValueError(f"{where}: model must be a local directory path, got {entry!r}")
    if "+" in path:
        raise ValueError(f"{where}: LoRA model references ({path!r}) are not supported")
    return path


def parse_config(raw: Mapping[str, Any]) -> MergeConfig:
    """Validates a mergekit configuration dict (as loaded from YAML) and resolves its parameters.

    Raises:
      ValueError: naming the unsupported or malformed option.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"a mergekit config is a mapping, got {type(raw).__name__}")
    refused = sorted(k for k in raw if k in _REFUSED_KEYS and raw[k] is not None)
    if refused:
        raise ValueError(f"unsupported mergekit options: {', '.join(refused)} (mergejax merges whole models only)")
    unknown = sorted(set(raw) - _TOP_KEYS - _REFUSED_KEYS)
    if unknown:
        raise ValueError(f"unknown mergekit config keys: {', '.join(unknown)}")
    method = raw.get("merge_method")
    if method not in METHODS:
        raise ValueError(f"merge_method {method!r} is not supported; supported: {', '.join(METHODS)}")
    if not raw.get("models"):
        raise ValueError("config has no 'models' list")
    base = raw.get("base_model")
    base = None if base is None else _model_path(base, "base_model")
    if method != "linear" and base is None:
        raise ValueError(f"merge_method {method} needs a base_model")
    top = dict(raw.get("parameters") or {})
    per_model = {"weight", "density"} | ({"gamma"} if method.startswith("breadcrumbs") else set())
    if method == "linear":
        allowed_top, per_model = {"normalize"} | {"weight"}, {"weight"}
    else:
        allowed_top = _SHARED | per_model
    bad = sorted(set(top) - allowed_top)
    if bad:
        raise ValueError(f"parameters: {', '.join(bad)} not supported by merge_method {method}")
    models = []
    for i, entry in enumerate(raw["models"]):
        where = f"models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise ValueError(f"{where}: expected a mapping with a 'model' key, got {entry!r}")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ValueError(f"{where}: unknown keys {', '.join(extra)}")
        path = _model_path(entry["model"], where)
        params = dict(entry.get("parameters") or {})
        bad = sorted(set(params) - per_model)
        if bad:
            raise ValueError(f"{where} ({path}): parameters {', '.join(bad)} not supported by merge_method {method}")
        if base is not None and os.path.normpath(path) == os.path.normpath(base) and method != "linear":
            continue  # mergekit lets the base model appear in the list; it is not a task
        value = {**{k: top[k] for k in per_model if k in top}, **params}
        if "weight" not in value:
            raise ValueError(f"{where} ({path}): parameter 'weight' is required by merge_method {method}")
        resolved = {k: _scalar(v, k, where, float) for k, v in value.items()}
        for k in ("density", "gamma"):
            if k in resolved and not 0.0 <= resolved[k] <= 1.0:
                raise ValueError(f"{where} ({path}): {k} must be in [0, 1], got {resolved[k]}")
        models.append(ModelSpec(path, **resolved))
    if not models:
        raise ValueError("config has no model to merge besides the base model")
    if method == "linear" and base is not None and all(
        os.path.normpath(m.path) != os.path.normpath(base) for m in models
    ):
        raise ValueError(
            "linear: base_model is not in models (mergekit then adds it as an input without a weight); "
            "list it under models with a weight, or drop base_model"
        )
    defaults = (True, False) if method == "linear" else _GTA[method][2:]
    shared = {k: _scalar(top[k], k, "parameters", bool if k != "lambda" else float) for k in _SHARED & set(top)}
    for key in ("dtype", "out_dtype"):
        if raw.get(key) is not None and str(raw[key]).removeprefix("torch.") not in _DTYPES:
            raise ValueError(f"{key} {raw[key]!r} is not one of {', '.join(_DTYPES)}")
    dt = lambda k: None if raw.get(k) is None else str(raw[k]).removeprefix("torch.")  # noqa: E731
    return MergeConfig(
        method=method,
        base_model=base,
        models=tuple(models),
        normalize=shared.get("normalize", defaults[0]),
        rescale=shared.get("rescale", defaults[1]),
        lambda_=shared.get("lambda", 1.0),
        int8_mask=shared.get("int8_mask", False),
        dtype=dt("dtype"),
        out_dtype=dt("out_dtype"),
    )


def load_config(path: str | os.PathLike[str]) -> MergeConfig:
    """Reads and validates a mergekit YAML file (model paths stay as written; see :meth:`MergeConfig.resolve`)."""
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f)
    return parse_config(raw)


# ---------------------------------------------------------------------------------------------------------------
# the per-tensor operator


def _rescale_l1(delta: jax.Array, kept: jax.Array, eps: float = 1e-7) -> jax.Array:
    """mergekit's ``rescaled_masked_tensor`` with the L1 norm: kept * ||delta||_1 / ||kept||_1 unless a norm < eps."""
    before, after = jnp.sum(jnp.abs(delta)), jnp.sum(jnp.abs(kept))
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, kept * (before / jnp.where(ok, after, 1.0)), kept)


def _band(delta: jax.Array, lo: int, hi: int) -> jax.Array:
    """delta where its descending |.| rank (0-based, over the flattened tensor) lies in [lo, hi), else 0."""
    a = jnp.abs(delta)
    keep = a >= kth_largest_magnitude([delta], hi) if hi > 0 else jnp.zeros(delta.shape, bool)
    if lo > 0:
        keep = keep & (a < kth_largest_magnitude([delta], lo))
    return jnp.where(keep, delta, jnp.zeros_like(delta))


def _sparsify(cfg: MergeConfig, m: ModelSpec, delta: jax.Array, key: jax.Array | None, band: Any = None
              ) -> jax.Array:
    """mergekit's ``sparsify`` of one delta tensor (magnitude, random or magnitude_outliers), then optional L1 rescale.

    ``band`` (a chunk of a larger tensor): the tensor's magnitude band from :func:`tensor_bands`, applied to the chunk.
    """
    method, d, n = cfg.sparsification, m.density, int(delta.size)
    if method is None or d >= 1:
        return delta
    if band is not None:  # keep where hi <= |delta| (< lo with use_lo), none where `none`: _band with given ranks
        hi, lo, none, use_lo = band
        a = jnp.abs(delta)
        keep = (a >= hi.astype(a.dtype)) & ~none & (~use_lo | (a < lo.astype(a.dtype)))
        return jnp.where(keep, delta, jnp.zeros_like(delta))
    if method == "magnitude":
        kept = jnp.zeros_like(delta) if d <= 0 or n == 0 else _band(delta, 0, max(1, int(d * n)))
    elif method == "magnitude_outliers":
        target = int(d * n)
        lo = min(int(m.gamma * n), n - target)
        kept = _band(delta, lo, lo + target)
    else:  # random (DARE): keep with probability d
        kept = jnp.where(jax.random.bernoulli(key, d, delta.shape), delta, jnp.zeros_like(delta))
    return _rescale_l1(delta, kept) if cfg.rescale else kept


def _tensor_key(key: jax.Array, name: str) -> jax.Array:
    """A tensor's PRNG key: fold in a stable hash of its name (the same in memory and streaming, in any order)."""
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


@partial(jax.jit, static_argnums=0)
def _merge_tensor_jit(cfg: MergeConfig, base, finetuned, key, bands=None):
    acc = _acc(base, finetuned)
    weights = [jnp.asarray(m.weight, acc) for m in cfg.models]
    if cfg.method == "linear":
        inputs = [jnp.asarray(x, acc) for x in finetuned]
        out = sum((w * x for w, x in zip(weights[1:], inputs[1:])), weights[0] * inputs[0])
        return out / sum(weights[1:], weights[0]) if cfg.normalize else out
    b = jnp.asarray(base, acc)
    deltas = [
        _sparsify(cfg, m, jnp.asarray(x, acc) - b, None if key is None else jax.random.fold_in(key, i),
                  None if bands is None else bands[i])
        for i, (m, x) in enumerate(zip(cfg.models, finetuned))
    ]
    weighted = [w * d for w, d in zip(weights, deltas)]
    if cfg.consensus == "sum":
        majority = jnp.where(sign_mass(weighted, "sum") >= 0, 1.0, -1.0).astype(acc)
        masks = [(jnp.sign(x) == majority).astype(acc) for x in weighted]
        mixed = sum(x * mk for x, mk in zip(weighted[1:], masks[1:])) + weighted[0] * masks[0]
        divisor = sum(w * mk for w, mk in zip(weights[1:], masks[1:])) + weights[0] * masks[0]
        divisor = jnp.where(divisor == 0, jnp.ones_like(divisor), divisor)
    else:
        mixed = sum(weighted[1:], weighted[0])
        total = sum(weights[1:], weights[0])
        divisor = jnp.where(jnp.abs(total) < 1e-8, jnp.ones_like(total), total)
    if cfg.normalize:
        mixed = mixed / divisor
    if cfg.lambda_ != 1:
        mixed = mixed * jnp.asarray(cfg.lambda_, acc)
    return b + mixed


def _acc(base: Any, finetuned: Any) -> Any:
    return jnp.float64 if any(x.dtype == jnp.float64 for x in (base, *finetuned)) else jnp.float32


def _in_dtype(cfg: MergeConfig, x: Any) -> Any:
    """An input cast to the config's ``dtype`` (what mergekit's loader does); unchanged without one."""
    if cfg.dtype is None:
        return x
    dt = _DTYPES[cfg.dtype]
    return x.astype(dt, copy=False) if isinstance(x, np.ndarray) else jnp.asarray(x, dt)


def out_dtype(cfg: MergeConfig, stored: np.dtype) -> np.dtype:
    """The written dtype of a tensor stored as ``stored``: ``out_dtype``, else ``dtype``, else the base's."""
    name = cfg.out_dtype or cfg.dtype
    return _DTYPES[name] if name else np.dtype(stored)


def coordinatewise(cfg: MergeConfig) -> bool:
    """Whether the config maps coordinates independently within every tensor (no per-tensor statistic): linear,
    task_arithmetic, and the other methods when no model is sparsified (every density >= 1, mergekit's shortcut).
    Such a config streams over flat chunks that join small tensors and cut large ones."""
    return cfg.sparsification is None or all(m.density >= 1 for m in cfg.models)


def _cast_inputs(cfg: MergeConfig, base: Any, finetuned: tuple) -> tuple:
    """The chunks cast to the config's ``dtype`` (traced), the base a float32 zero when absent (``linear``)."""
    cast = (lambda x: x) if cfg.dtype is None else (lambda x: x.astype(_DTYPES[cfg.dtype]))
    return (jnp.zeros((), jnp.float32) if base is None else cast(base)), tuple(cast(x) for x in finetuned)


@partial(jax.jit, static_argnums=(0, 3))
def _merge_chunk_jit(cfg: MergeConfig, base, finetuned: tuple, dtype: np.dtype, bands=None):
    """:func:`merge_tensor` on flat chunks, the ``dtype`` casts inside one program."""
    b, fts = _cast_inputs(cfg, base, finetuned)
    return _merge_tensor_jit(cfg, b, fts, None, bands).astype(dtype)


def band_chunked(cfg: MergeConfig) -> bool:
    """Whether a sparsified config streams each large tensor over chunks once its per-tensor magnitude band is known
    (:func:`tensor_bands`): ``magnitude`` (TIES) and ``magnitude_outliers`` (Breadcrumbs) without ``rescale``. DARE's
    masks (drawn per tensor shape) and the L1 rescale (a float sum over the tensor) stay tensor by tensor."""
    return not coordinatewise(cfg) and cfg.sparsification in ("magnitude", "magnitude_outliers") and not cfg.rescale


def merge_chunk(cfg: MergeConfig, base: jax.Array | None, finetuned: list[jax.Array], bands: Any = None
                ) -> jax.Array:
    """A coordinatewise config (:func:`coordinatewise`) on flat chunks of float tensors (any concatenation of
    their elements), or a :func:`band_chunked` one on chunks of one tensor given its ``bands``: the same values as
    :func:`merge_tensor` on each tensor, in the output dtype.

    Args:
      cfg: the parsed config.
      base: the base's chunk (None for ``linear``).
      finetuned: the chunks of ``cfg.models``, in order.
      bands: :func:`tensor_bands` of the tensor the chunk belongs to (sparsified configs).

    Returns:
      The merged chunk.
    """
    if not coordinatewise(cfg) and (bands is None or not band_chunked(cfg)):
        raise ValueError(f"merge_method {cfg.method} with density < 1 ranks or draws within each tensor: "
                         "merge it tensor by tensor (merge_tensor), or chunk it with its tensor_bands")
    ref = finetuned[0] if base is None else base
    return _merge_chunk_jit(cfg, base, tuple(finetuned), out_dtype(cfg, ref.dtype), bands)


def _band_ranks(cfg: MergeConfig, m: ModelSpec, n: int) -> tuple[int, int]:
    """(hi, lo) descending ranks of ``_sparsify``'s band in a tensor of ``n`` entries: keep ranks [lo, hi)."""
    if cfg.sparsification == "magnitude":
        return (0 if m.density <= 0 else max(1, int(m.density * n))), 0
    target = int(m.density * n)
    lo = min(int(m.gamma * n), n - target)
    return lo + target, lo


@partial(jax.jit, static_argnums=0, static_argnames=("groups", "shift", "filtered", "on_device"))
def _delta_digits(cfg: MergeConfig, base, finetuned: tuple, n, prefix, *, groups: tuple[int, ...], shift: int,
                  filtered: bool, on_device: bool) -> list:
    """Per group g, the histogram digits of |delta| of model ``groups[g]`` on one chunk (as ``_merge_tensor_jit``
    computes delta), for :func:`tensor_bands`'s passes."""
    from mergejax.stream import magnitude_digits

    b, fts = _cast_inputs(cfg, base, finetuned)
    acc = _acc(b, fts)
    return [magnitude_digits(jnp.asarray(fts[i], acc) - jnp.asarray(b, acc), n, prefix[g], shift=shift,
                             filtered=filtered, on_device=on_device) for g, i in enumerate(groups)]


def tensor_bands(cfg: MergeConfig, name: str, n: int, scan: Any) -> tuple | None:
    """The magnitude band of every model in one tensor of ``n`` entries, exactly as ``_sparsify`` ranks it in
    memory (the k-th largest |delta| with multiplicity, by :func:`mergejax.stream._radix_passes`: two exact
    histogram passes over the tensor's chunks).

    Args:
      cfg: a :func:`band_chunked` config.
      name: the tensor (for progress and errors).
      n: its number of entries.
      scan: ``scan(f)`` calls ``f(base_chunk, finetuned_chunks, n_valid)`` on each of the tensor's chunks.

    Returns:
      Per model, ``(hi, lo, none, use_lo)``: keep the entries with ``hi <= |delta|`` (and ``|delta| < lo`` where
      ``use_lo``), none where ``none``; None where no model is sparsified.
    """
    from mergejax.stream import _device_histogram, _radix_passes, count_digits

    ranks = [_band_ranks(cfg, m, n) for m in cfg.models]
    active = [i for i, m in enumerate(cfg.models) if m.density < 1]
    groups, ks = [], []
    for i in active:
        for r in ranks[i]:
            if r > 0:
                groups.append(i)
                ks.append(r)
    values: list[float] = []
    if ks:
        on_device = _device_histogram()

        def count_pass(p: int, prefix: list[int], desc: str) -> np.ndarray:
            hist = np.zeros((len(ks), 1 << 16), np.int64)
            pre = jnp.asarray(np.asarray(prefix, np.uint32))

            def f(base: Any, fts: list, n_valid: int) -> None:
                outs = _delta_digits(cfg, base, tuple(fts), jnp.int32(n_valid), pre, groups=tuple(groups),
                                     shift=16 - 16 * p, filtered=p > 0, on_device=on_device)
                for g, o in enumerate(outs):
                    hist[g] += count_digits(o, on_device)

            scan(f)
            return hist

        keys = _radix_passes(count_pass, ks, lambda: 32, f"band {name}")
        values = [float(v) for v in np.asarray(keys, np.uint32).view(np.float32)]
    out, j = [], 0
    for i, (hi, lo) in enumerate(ranks):
        t_hi = t_lo = 0.0
        if i in active and hi > 0:
            t_hi, j = values[j], j + 1
        if i in active and lo > 0:
            t_lo, j = values[j], j + 1
        out.append((jnp.float32(t_hi), jnp.float32(t_lo), jnp.bool_(hi == 0), jnp.bool_(lo > 0)))
    return tuple(out)


def merge_tensor(
    cfg: MergeConfig, name: str, base: Any, finetuned: list[Any], *, key: jax.Array | None = None
) -> jax.Array:
    """One merged tensor, as mergekit computes it (see the module docstring), in the config's output dtype.

    Args:
      cfg: the parsed config.
      name: the tensor's name (keys the DARE mask; used in error messages).
      base: the base model's tensor (ignored by ``linear``; may be None there).
      finetuned: the tensors of ``cfg.models``, in order.
      key: ``jax.random`` key, required by dare_* with a density below 1.

    Returns:
      A ``jax.Array`` with the base's shape (the first input's for ``linear``).
    """
    ref = finetuned[0] if base is None else base
    for m, x in zip(cfg.models, finetuned):
        if tuple(x.shape) != tuple(ref.shape):
            raise ValueError(f"tensor {name!r}: {m.path} has shape {tuple(x.shape)} {x.dtype}, expected {tuple(ref.shape)}")
    if not jnp.issubdtype(ref.dtype, jnp.floating):
        if cfg.method == "linear":
            raise ValueError(f"tensor {name!r}: linear merging needs floating-point tensors, got {ref.dtype}")
        return jnp.asarray(ref)
    if cfg.needs_key and key is None:
        raise ValueError(f"merge_method {cfg.method} with density < 1 draws random masks: pass key=jax.random.key(seed)")
    tkey = None if key is None or not cfg.needs_key else _tensor_key(key, name)
    dtype = out_dtype(cfg, ref.dtype)
    b = None if base is None else _in_dtype(cfg, base)
    merged = _merge_tensor_jit(cfg, b if b is not None else jnp.zeros((), jnp.float32),
                               tuple(_in_dtype(cfg, x) for x in finetuned), tkey)
    return merged.astype(dtype)


def merge_in_memory(
    cfg: MergeConfig,
    base: Mapping[str, Any] | None,
    finetuned: list[Mapping[str, Any]],
    *,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """The config applied to in-memory models: dicts of tensor name -> array (numpy or ``jax.Array``, sharded or not).

    Args:
      cfg: the parsed config (its paths are not read).
      base: the base model's tensors (None for ``linear`` without a base).
      finetuned: one dict per entry of ``cfg.models``, in order, with the base's names.
      key: ``jax.random`` key for dare_*.

    Returns:
      name -> merged tensor, in the base's (first model's) name order.
    """
    if len(finetuned) != len(cfg.models):
        raise ValueError(f"config lists {len(cfg.models)} models, got {len(finetuned)}")
    ref = finetuned[0] if base is None or cfg.method == "linear" else base
    for m, tree in zip(cfg.models, finetuned):
        missing = sorted(set(ref) - set(tree))
        if missing:
            raise ValueError(f"{m.path} lacks tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return {
        name: merge_tensor(
            cfg, name, None if cfg.method == "linear" else base[name], [t[name] for t in finetuned], key=key
        )
        for name in ref
    }


def run_config(
    config: str | os.PathLike[str] | MergeConfig,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    max_shard_size: int | str = "5GB",
    progress: bool = True,
    chunk: int | str | None = None,
) -> Path:
    """Merges the checkpoints a mergekit config names into ``out`` (sharded safetensors + index + config.json).

    Streams through :func:`mergejax.stream.merge_tensors` (resumable): a coordinatewise config (linear,
    task_arithmetic, any method without sparsification; :func:`coordinatewise`) over flat chunks of ``chunk`` bytes
    that join small tensors and cut large ones (one compiled program per dtype signature and size bucket, one
    dispatch per chunk); TIES and Breadcrumbs (:func:`band_chunked`: mergekit's per-tensor top-k and bands) with
    the tensors of at most one chunk whole and each larger one over its own chunks, after two histogram passes over
    them for its per-model thresholds (:func:`tensor_bands`; host memory: a few chunks); DARE masks and the L1
    rescale tensor by tensor (peak host memory about (T + 2) x the largest tensor). All write the tensors
    :func:`merge_tensor` gives.

    Args:
      config: a YAML path or a parsed :class:`MergeConfig` (relative model paths resolve against the cwd).
      out: output directory.
      seed: seed of the dare_* masks.
      max_shard_size: shard size limit ("5GB", bytes).
      progress: show a progress bar.
      chunk: the flat chunk of a coordinatewise config ("16MiB" or bytes).
    """
    from mergejax.stream import CHUNK, merge_tensors

    cfg = (config if isinstance(config, MergeConfig) else load_config(config)).resolve()
    inputs = [m.path for m in cfg.models]
    base = cfg.base_model if cfg.method != "linear" or cfg.base_model is None else None
    key = jax.random.key(seed) if cfg.needs_key else None

    def fn(name: str, b: Any, fts: list[Any]) -> np.ndarray:
        return np.asarray(merge_tensor(cfg, name, b, fts, key=key))

    banded = band_chunked(cfg)
    wide = cfg.dtype == "float64"  # float64 deltas: the band passes rank float32 bits, so such tensors go whole
    return merge_tensors(
        fn,
        base,
        inputs,
        out,
        out_dtype=lambda info: out_dtype(cfg, info.dtype),
        fingerprint=repr((cfg, seed)),
        max_shard_size=max_shard_size,
        progress=progress,
        copy_from=cfg.base_model or inputs[0],
        elementwise=partial(merge_chunk, cfg) if coordinatewise(cfg) or banded else None,
        chunk=CHUNK if chunk is None else chunk,
        tensor_stats=partial(tensor_bands, cfg) if banded else None,
        chunk_if=lambda name, dtypes: not wide and all(np.dtype(d) != np.float64 for d in dtypes),
    )


def main(argv: list[str]) -> int:
    """``python -m mergejax merge CONFIG.yaml OUT [--seed N] [--max-shard-size 5GB]``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m mergejax merge", description="Run a mergekit YAML config.")
    p.add_argument("config", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0, help="seed of the dare_* drop masks")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ValueError as e:  # the CLI prints it as one line (exit status 2)
        raise ValueError(f"{args.config}: {e}") from None
    out = run_config(cfg, args.out, seed=args.seed, max_shard_size=args.max_shard_size, progress=not args.no_progress)
    print(f"{cfg.method} of {len(cfg.models)} models -> {out}")
    return 0
