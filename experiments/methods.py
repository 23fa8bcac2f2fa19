"""Every merging method of mergejax as a benchmark entry: a method key, a label, a small grid, and a builder.

A builder maps ``(run, hyperparameters)`` to the model(s) to evaluate: one merged tree (every task evaluated on it with
its own expert's head), or a list of T trees (``experts``, ``compeft_experts``: task t evaluated on tree t). Grids
follow the papers' sweeps, shortened (``Grids``); the runner picks the best point on the validation split.

Per-task heads are never merged. The data-free methods see task vectors whose head leaves are zero (the experts with
the base's heads), and the expert heads are put back afterwards (:meth:`benchmark.Run.with_heads`).
# TODO(issue 8): heads= has landed on the named methods; pass heads=HEADS instead of stripping heads (same result).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import mergejax as mj
from mergejax import ternary

from experiments.backbones import HEADS

if TYPE_CHECKING:  # pragma: no cover
    from experiments.benchmark import Run


@dataclasses.dataclass(frozen=True)
class Grids:
    """Hyperparameter grids (validation split picks the best point)."""

    ta_scales: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0, 1.5)
    ties_densities: tuple[float, ...] = (0.1, 0.2)
    ties_scales: tuple[float, ...] = (0.7, 1.0, 1.5)
    dare_drops: tuple[float, ...] = (0.5, 0.9)
    breadcrumbs_betas: tuple[float, ...] = (0.1, 0.2)
    pcb_ratios: tuple[float, ...] = (0.1, 0.2)
    pcb_scales: tuple[float, ...] = (0.8, 1.2, 1.6)
    lines_alphas: tuple[float, ...] = (0.5, 1.0)
    lines_betas: tuple[float, ...] = (0.5, 1.0)
    regmean_alphas: tuple[float, ...] = (0.5, 0.9)
    compeft_densities: tuple[float, ...] = (0.05, 0.1, 0.2)
    compeft_alphas: tuple[float, ...] = ternary.ALPHA_GRID
    """Candidates for each ComPEFT expert's alpha (0.5-10). Until the eighth sitting {1, 2, 4, 8}, which missed the
    best alpha 3 of every vision expert at k = 20% (experiments/results/isolate/compeft_alone_vision_seed2.md)."""
    sota_scales: tuple[float, ...] = (0.5, 1.0, 1.5)
    """TSV-M and DELLA's lambda (FusionBench: 1.0)."""
    iso_scales: tuple[float, ...] = (1.0, 1.5, 2.0)
    """Iso-C / Iso-CTS lambda (the paper tunes it on validation; FusionBench about 1.5)."""
    cart_coeffs: tuple[float, ...] = (1.0, 2.0)
    """CART's low-rank coefficient (the authors' 8-task default 2.0), rank ratio 0.12."""
    consensus_lams: tuple[float, ...] = (0.4, 0.6)
    """TALL-mask lambda of Consensus TA/TIES (the paper's grid is 0.2-0.6), k = 2."""
    della_densities: tuple[float, ...] = (0.2, 0.5)
    """DELLA's mean keep probability (epsilon 0.1)."""
    compeft_ta_scales: tuple[float, ...] = (0.5, 0.7, 1.0, 1.5, 2.0)
    """lambda of TA of the ComPEFT experts at a common alpha = 1 (the merge's lambda is the common alpha)."""
    compeft_ties_scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 4.0)
    """lambda of TIES of the ComPEFT experts at alpha = 1: the disjoint mean of sigma_t sign entries is about half
    the norm of dense TIES's (experiments/results/isolate/compeft.json), so the grid sits above TIES's."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the benchmark."""

    key: str
    label: Callable[[dict[str, Any]], str]
    grid: Callable[[Grids, "Run"], list[dict[str, Any]]]
    build: Callable[["Run", dict[str, Any]], Any]
    data_informed: bool = False


def _product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
    names = list(axes)
    return [dict(zip(names, vals)) for vals in itertools.product(*(axes[n] for n in names))]


def _none(g: Grids, run: "Run") -> list[dict[str, Any]]:
    return [{}]


def _pct(x: float) -> str:
    return f"{100 * x:g}%"


# --------------------------------------------------------------------------------------------- builders
def _base(run: "Run", hp: dict) -> Any:
    return run.with_heads(run.backbone.base)


def _experts(run: "Run", hp: dict) -> list[Any]:
    return list(run.experts)


def _average(run: "Run", hp: dict) -> Any:
    return run.with_heads(mj.average(run.stripped))


def _task_arithmetic(run: "Run", hp: dict) -> Any:
    return run.with_heads(mj.task_arithmetic(run.backbone.base, run.stripped, scale=hp["scale"]))


def _at_scale(run: "Run", key: tuple, make: Callable[[], Any], scale: float, keep: bool = False) -> Any:
    """Every data-free merge here is theta_0 + lambda * tau_merged (mergejax.merge): ``make()`` merges once at
    lambda = 1 (cached under ``key``), each grid point rescales. ``keep``: cache for the whole seed (TIES, reused by
    LiNeS), else until the method is done (``benchmark.run_method`` clears ``run.merge_cache``)."""
    store = run._cache if keep else run.merge_cache
    if key not in store:
        store[key] = make()
    return run.with_heads(run.rescaled(store[key], scale))


def _ties_unit(run: "Run", density: float) -> Any:
    return _at_scale(run, ("ties", density), lambda: mj.ties(run.backbone.base, run.stripped, density=density),
                     1.0, keep=True)


def _ties(run: "Run", hp: dict) -> Any:
    _ties_unit(run, hp["density"])
    return run.with_heads(run.rescaled(run._cache[("ties", hp["density"])], hp["scale"]))


def _dare(combine: str) -> Callable[["Run", dict], Any]:
    def build(run: "Run", hp: dict) -> Any:
        extra = {"density": hp["density"]} if combine == "ties" else {}
        return _at_scale(run, ("dare", combine, hp["drop_rate"], *extra.values()), lambda: mj.dare(
            run.backbone.base, run.stripped, key=run.key("dare"), drop_rate=hp["drop_rate"], combine=combine,
            **extra), hp["scale"])

    return build


def _breadcrumbs(run: "Run", hp: dict) -> Any:
    return _at_scale(run, ("breadcrumbs", hp["beta"], hp["gamma"]), lambda: mj.breadcrumbs(
        run.backbone.base, run.stripped, beta=hp["beta"], gamma=hp["gamma"], scale=1.0), hp["scale"])


def _pcb(run: "Run", hp: dict) -> Any:
    return _at_scale(run, ("pcb", hp["ratio"]), lambda: mj.pcb(run.backbone.base, run.stripped, ratio=hp["ratio"],
                                                               scale=1.0), hp["scale"])


def _lines(run: "Run", hp: dict) -> Any:
    # TIES + LiNeS = LiNeS applied to TIES's merged task vector (chain(Trim, ElectSign, DisjointMean, LiNeS)):
    # the one TIES vector at lambda = 1 (cached by the TIES row), scaled layer by layer
    ties_unit = _ties_unit(run, hp["density"])
    lines = mj.lines(hp["alpha"], hp["beta"], run.backbone.blocks)
    return run.with_heads(mj.chain(lines, mj.Sum())(run.backbone.base, [run.strip_heads(ties_unit)], scale=1.0))


def _fisher(run: "Run", hp: dict) -> Any:
    return run.with_heads(mj.fisher_merge(run.experts, run.fishers(), heads=HEADS, base=run.backbone.base))


def _regmean(run: "Run", hp: dict) -> Any:
    merged = mj.regmean(run.backbone.apply_fn, run.backbone.base, run.experts, (), grams=run.grams(),
                        alpha=hp["alpha"], heads=HEADS)
    return run.with_heads(merged)


def _adamerging(granularity: str, plus_plus: bool) -> Callable[["Run", dict], Any]:
    def build(run: "Run", hp: dict) -> Any:
        return run.adamerging(range(len(run.tasks)), granularity=granularity, plus_plus=plus_plus)

    return build


def _compeft_experts(run: "Run", hp: dict) -> list[Any]:
    ttvs = run.compeft(hp["density"])
    return [run.with_heads(ternary.apply(run.backbone.base, t)) for t in ttvs]


def compeft_common_alpha(run: "Run") -> list[Any]:
    """The ComPEFT experts at the chosen density with one common alpha = 1: ``sigma_t * sign(tau_t)`` on each mask.

    Each expert's alpha is picked on its own validation split for the expert alone (2 or 4 on MiniLM); merged as
    they are, those alphas act as untuned per-task weights (2:1 between tasks) that no common lambda undoes, and
    TA of the ComPEFT experts fell 5.5 points below TA (seed 0; experiments/results/isolate/). At a common alpha
    the merge's lambda plays the common alpha, chosen on validation for the merged model. Same masks, signs and
    bits as the chosen experts (only the stored scalar changes).
    """
    return [ternary.with_alpha(t, 1.0) for t in run.compeft(run.chosen_compeft_density())]


def _compeft_ta(run: "Run", hp: dict) -> Any:
    return _at_scale(run, ("compeft_ta",), lambda: mj.task_arithmetic(run.backbone.base, compeft_common_alpha(run)),
                     hp["scale"])


def _compeft_ties(run: "Run", hp: dict) -> Any:
    # the experts are already trimmed to ComPEFT's density: TIES keeps them all (density 1) and elects signs
    return _at_scale(run, ("compeft_ties",), lambda: mj.ties(run.backbone.base, compeft_common_alpha(run),
                                                             density=1.0), hp["scale"])


def _sota(fn: Callable[..., Any], matrix: bool = False) -> Callable[["Run", dict], Any]:
    """A data-free mergejax method called on the head-stripped experts with the grid point ``hp`` as keywords;
    ``matrix``: a matrix method, given the backbone's ``matrix_axes`` (a conv net's kernels merge as matrices)."""
    def build(run: "Run", hp: dict) -> Any:
        rest = {k: v for k, v in hp.items() if k != "scale"}
        extra = {"matrix_axes": run.backbone.matrix_axes} if matrix and run.backbone.matrix_axes is not None else {}
        return _at_scale(run, (fn.__name__, *sorted(rest.items())),
                         lambda: fn(run.backbone.base, run.stripped, **rest, **extra), hp.get("scale", 1.0))

    return build


def _wudi(run: "Run", hp: dict) -> Any:
    # the token/position embeddings go to the averaging branch: WUDI's input-side Gram is defined for the linear
    # layers (FusionBench merges the transformer's linear layers)
    return run.with_heads(mj.wudi(run.backbone.base, run.stripped, steps=run.cfg.wudi_steps,
                                  exclude=r"embeddings/", progress=run.cfg.progress,
                                  matrix_axes=run.backbone.matrix_axes))


def _della(run: "Run", hp: dict) -> Any:
    # DARE-like: MagPrune drop with 1/p rescaling, then a plain (task-arithmetic) sum
    return _at_scale(run, ("della", hp["density"]), lambda: mj.della(
        run.backbone.base, run.stripped, key=run.key("della"), density=hp["density"], epsilon=0.1,
        combine="task_arithmetic"), hp["scale"])


def _emr(run: "Run", hp: dict) -> list[Any]:
    merged = mj.emr(run.backbone.base, run.stripped, heads=HEADS)
    return [run.with_heads(merged.model(t)) for t in range(len(run.tasks))]


# --------------------------------------------------------------------------------------------- the table
METHODS: tuple[Method, ...] = (
    Method("base", lambda hp: "zero-shot base (expert heads)", _none, _base),
    Method("experts", lambda hp: "individual experts", _none, _experts),
    Method("average", lambda hp: "weight averaging", _none, _average),
    Method("task_arithmetic", lambda hp: f"task arithmetic (lambda={hp['scale']:g})",
           lambda g, r: _product(scale=g.ta_scales), _task_arithmetic),
    Method("ties", lambda hp: f"TIES (k={_pct(hp['density'])}, lambda={hp['scale']:g})",
           lambda g, r: _product(density=g.ties_densities, scale=g.ties_scales), _ties),
    Method("dare_task_arithmetic", lambda hp: f"DARE + TA (p={hp['drop_rate']:g}, lambda={hp['scale']:g})",
           lambda g, r: _product(drop_rate=g.dare_drops, scale=g.ta_scales), _dare("task_arithmetic")),
    Method("dare_ties",
           lambda hp: f"DARE + TIES (p={hp['drop_rate']:g}, k={_pct(hp['density'])}, lambda={hp['scale']:g})",
           lambda g, r: _product(drop_rate=g.dare_drops, density=(r.chosen("ties", "density", 0.2),),
                                 scale=g.ties_scales), _dare("ties")),
    Method("breadcrumbs",
           lambda hp: f"Breadcrumbs (beta={hp['beta']:g}, gamma={hp['gamma']:g}, lambda={hp['scale']:g})",
           lambda g, r: _product(beta=g.breadcrumbs_betas, gamma=(0.006,), scale=g.ta_scales), _breadcrumbs),
    Method("pcb", lambda hp: f"PCB (ratio={hp['ratio']:g}, lambda={hp['scale']:g})",
           lambda g, r: _product(ratio=g.pcb_ratios, scale=g.pcb_scales), _pcb),
    Method("lines", lambda hp: f"TIES + LiNeS (k={_pct(hp['density'])}, alpha={hp['alpha']:g}, beta={hp['beta']:g})",
           lambda g, r: _product(density=(r.chosen("ties", "density", 0.2),), alpha=g.lines_alphas,
                                 beta=g.lines_betas), _lines),
    Method("fisher", lambda hp: "Fisher merging", _none, _fisher, data_informed=True),
    Method("regmean", lambda hp: f"RegMean (alpha={hp['alpha']:g})",
           lambda g, r: _product(alpha=g.regmean_alphas), _regmean, data_informed=True),
    Method("adamerging_task", lambda hp: "AdaMerging (task-wise)", _none, _adamerging("task", False),
           data_informed=True),
    Method("adamerging_layer", lambda hp: "AdaMerging (layer-wise)", _none, _adamerging("layer", False),
           data_informed=True),
    Method("adamerging_plus_plus", lambda hp: "AdaMerging++ (layer-wise)", _none, _adamerging("layer", True),
           data_informed=True),
    Method("compeft_experts", lambda hp: f"ComPEFT experts alone (k={_pct(hp['density'])})",
           lambda g, r: _product(density=g.compeft_densities), _compeft_experts),
    Method("compeft_task_arithmetic", lambda hp: f"TA of ComPEFT experts (alpha=1, lambda={hp['scale']:g})",
           lambda g, r: _product(scale=g.compeft_ta_scales), _compeft_ta),
    Method("compeft_ties", lambda hp: f"TIES of ComPEFT experts (alpha=1, lambda={hp['scale']:g})",
           lambda g, r: _product(scale=g.compeft_ties_scales), _compeft_ties),
    # methods beyond the list (key = mergejax function name). model_stock is left out: it averages
    # fine-tunes of ONE task (Jang et al., 2024), so it has no meaning on a multi-task table.
    Method("tsv", lambda hp: f"TSV-M (lambda={hp['scale']:g})", lambda g, r: _product(scale=g.sota_scales),
           _sota(mj.tsv, matrix=True)),
    Method("iso_c", lambda hp: f"Iso-C (lambda={hp['scale']:g})", lambda g, r: _product(scale=g.iso_scales),
           _sota(mj.iso_c, matrix=True)),
    Method("iso_cts", lambda hp: f"Iso-CTS (lambda={hp['scale']:g})", lambda g, r: _product(scale=g.iso_scales),
           _sota(mj.iso_cts, matrix=True)),
    Method("wudi", lambda hp: "WUDI merging", _none, _wudi),
    Method("cart", lambda hp: f"CART (k=12%, c={hp['coeff']:g})",
           lambda g, r: _product(rank_ratio=(0.12,), coeff=g.cart_coeffs), _sota(mj.cart, matrix=True)),
    Method("consensus_ta", lambda hp: f"Consensus TA (lam={hp['lam']:g}, lambda={hp['scale']:g})",
           lambda g, r: _product(lam=g.consensus_lams, k=(2,), scale=(r.chosen("task_arithmetic", "scale", 0.3),)),
           _sota(mj.consensus_ta)),
    Method("consensus_ties",
           lambda hp: f"Consensus TIES (lam={hp['lam']:g}, k={_pct(hp['density'])}, lambda={hp['scale']:g})",
           lambda g, r: _product(lam=g.consensus_lams, k=(2,), density=(r.chosen("ties", "density", 0.2),),
                                 scale=(r.chosen("ties", "scale", 1.0),)), _sota(mj.consensus_ties)),
    Method("della", lambda hp: f"DELLA + TA (p_keep={hp['density']:g}, lambda={hp['scale']:g})",
           lambda g, r: _product(density=g.della_densities, scale=g.sota_scales), _della),
    Method("emr", lambda hp: "EMR-Merging (per-task masks, rescalers)", _none, _emr),
)
METHOD_KEYS = tuple(m.key for m in METHODS)


def by_key(keys: Sequence[str] | None = None) -> tuple[Method, ...]:
    """The methods named by ``keys`` (all when None), in table order."""
    if keys is None:
        return METHODS
    unknown = sorted(set(keys) - set(METHOD_KEYS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHOD_KEYS)}")
    return tuple(m for m in METHODS if m.key in set(keys))

