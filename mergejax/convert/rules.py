"""Explicit, reversible rule tables between PyTorch state-dict names/layouts and Flax variable trees.

A rule pairs a torch key template with a Flax path template and a layout change. Templates name their variable parts
in braces: ``{i}`` matches a run of digits, ``{m}`` a dotted module path (written with ``/`` on the Flax side), and
``{name:REGEX}`` any regular expression. The same template pair is matched in either direction, so a rule table is
reversible by construction: ``encoder.layer.{i}.attention.self.query.weight`` <-> ``params/encoder/layer_{i}/attention/
query/kernel`` with the ``LINEAR`` layout (torch ``(out, in)`` <-> Flax ``(in, out)``).

Buffers that Flax does not keep (``position_ids``, ``num_batches_tracked``) are :class:`DropRule` entries: the forward
conversion records their values, and the reverse puts them back, from the record when one is given (bit-exact) or made
afresh from an anchor leaf of the Flax tree (``arange`` for position ids, ``0`` for batch counters).

Adding an architecture: write a :class:`RuleSet` (a tuple of :class:`Rule` and :class:`DropRule`) whose Flax templates
follow the parameter names of your Flax module, register it with :func:`register_rules`, and check it with a round
trip and a forward-pass comparison (see ``tests/test_models_real.py``).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "Layout",
    "Rule",
    "DropRule",
    "RuleSet",
    "GENERIC",
    "BERT",
    "bert_rules",
    "EFFICIENTNET_LITE0",
    "get_rules",
    "register_rules",
    "available_rules",
]


class Layout(enum.Enum):
    """How a tensor's axes change between the torch and the Flax side."""

    IDENTITY = "identity"
    LINEAR = "linear"  # torch Linear weight (out, in) <-> Flax Dense kernel (in, out)
    CONV = "conv"  # torch Conv (O, I, *spatial) <-> Flax Conv (*spatial, I, O); covers 1-D/2-D/3-D and depthwise

    def to_flax_perm(self, ndim: int) -> tuple[int, ...]:
        """Axis permutation p with ``flax = torch.transpose(p)`` for a tensor of ``ndim`` axes."""
        if self is Layout.IDENTITY:
            return tuple(range(ndim))
        if self is Layout.LINEAR:
            if ndim != 2:
                raise ValueError(f"LINEAR layout needs a 2-D tensor, got {ndim}-D")
            return (1, 0)
        if ndim < 3:
            raise ValueError(f"CONV layout needs a tensor of 3 or more axes, got {ndim}-D")
        return tuple(range(2, ndim)) + (1, 0)

    def to_torch_perm(self, ndim: int) -> tuple[int, ...]:
        """Axis permutation q with ``torch = flax.transpose(q)`` (the inverse of :meth:`to_flax_perm`)."""
        return tuple(int(a) for a in np.argsort(self.to_flax_perm(ndim)))


_VAR = re.compile(r"\{(\w+)(?::([^{}]+))?\}")
_DEFAULT_PATTERNS = {"i": r"\d+", "j": r"\d+", "k": r"\d+", "m": r"[^/]+?(?:[./][^/]+?)*"}


def _compile(template: str, sep: str) -> tuple[re.Pattern[str], dict[str, str]]:
    """Turn a template into an anchored regex; returns it and each variable's custom pattern (if any)."""
    out, pos, custom = [], 0, {}
    for match in _VAR.finditer(template):
        out.append(re.escape(template[pos : match.start()]))
        name, pattern = match.group(1), match.group(2)
        if pattern is None:
            pattern = _DEFAULT_PATTERNS.get(name, r"[^./]+")
            if name == "m":
                pattern = r"[^./]+(?:" + re.escape(sep) + r"[^./]+)*"
        else:
            custom[name] = pattern
        out.append(f"(?P<{name}>{pattern})")
        pos = match.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z"), custom


def _fill(template: str, groups: Mapping[str, str], from_sep: str, to_sep: str) -> str:
    def sub(match: re.Match[str]) -> str:
        value = groups[match.group(1)]
        return value.replace(from_sep, to_sep) if match.group(1) == "m" else value

    return _VAR.sub(sub, template)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One torch key template <-> one Flax path template, with a layout change.

    Attributes:
      torch: torch state-dict key template, e.g. ``"encoder.layer.{i}.output.dense.weight"``.
      flax: Flax path template (collections first), e.g. ``"params/encoder/layer_{i}/output/dense/kernel"``.
      layout: how axes move between the two sides.
      ndim: if set, the rule applies only to tensors with this many axes (used by the generic table to tell a Linear
        weight from a Conv weight).
    """

    torch: str
    flax: str
    layout: Layout = Layout.IDENTITY
    ndim: int | None = None

    def __post_init__(self) -> None:
        t_re, _ = _compile(self.torch, ".")
        f_re, _ = _compile(self.flax, "/")
        if set(t_re.groupindex) != set(f_re.groupindex):
            raise ValueError(f"rule {self.torch!r} <-> {self.flax!r}: the two templates name different variables")
        object.__setattr__(self, "_torch_re", t_re)
        object.__setattr__(self, "_flax_re", f_re)

    def to_flax(self, key: str, ndim: int) -> str | None:
        """The Flax path of torch ``key``, or None if this rule does not apply."""
        if self.ndim is not None and ndim != self.ndim:
            return None
        m = self._torch_re.match(key)  # type: ignore[attr-defined]
        return None if m is None else _fill(self.flax, m.groupdict(), ".", "/")

    def to_torch(self, path: str, ndim: int) -> str | None:
        """The torch key of Flax ``path``, or None if this rule does not apply."""
        if self.ndim is not None and ndim != self.ndim:
            return None
        m = self._flax_re.match(path)  # type: ignore[attr-defined]
        return None if m is None else _fill(self.torch, m.groupdict(), "/", ".")


@dataclasses.dataclass(frozen=True)
class DropRule:
    """A torch buffer that the Flax tree does not hold, and how the reverse conversion makes it again.

    Attributes:
      torch: torch key template of the buffer, e.g. ``"{m}.num_batches_tracked"``.
      anchor: Flax path template whose matches say where such buffers belong, e.g. ``"batch_stats/{m}/mean"``.
      make: builds the buffer from the anchor leaf's shape when no conversion record holds its recorded value.
    """

    torch: str
    anchor: str
    make: Callable[[tuple[int, ...]], np.ndarray]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_torch_re", _compile(self.torch, ".")[0])
        object.__setattr__(self, "_anchor_re", _compile(self.anchor, "/")[0])

    def matches(self, key: str) -> bool:
        """Whether torch ``key`` is a buffer this rule drops."""
        return self._torch_re.match(key) is not None  # type: ignore[attr-defined]

    def restored_key(self, path: str) -> str | None:
        """The torch key of the buffer that belongs beside Flax leaf ``path``, or None."""
        m = self._anchor_re.match(path)  # type: ignore[attr-defined]
        return None if m is None else _fill(self.torch, m.groupdict(), "/", ".")


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """An ordered rule table; the first rule that matches a key wins (in both directions)."""

    name: str
    rules: tuple[Rule, ...]
    dropped: tuple[DropRule, ...] = ()

    def to_flax(self, key: str, ndim: int) -> tuple[str, Layout] | None:
        """Flax path and layout of torch ``key`` (None if no rule applies; see :meth:`is_dropped`)."""
        for rule in self.rules:
            path = rule.to_flax(key, ndim)
            if path is not None:
                return path, rule.layout
        return None

    def to_torch(self, path: str, ndim: int) -> tuple[str, Layout] | None:
        """Torch key and layout of Flax ``path`` (None if no rule applies)."""
        for rule in self.rules:
            key = rule.to_torch(path, ndim)
            if key is not None:
                return key, rule.layout
        return None

    def is_dropped(self, key: str) -> bool:
        """Whether torch ``key`` is a buffer that the Flax tree leaves out."""
        return any(d.matches(key) for d in self.dropped)


def _zeros_int64(shape: tuple[int, ...]) -> np.ndarray:
    del shape
    return np.zeros((), np.int64)


def _position_ids(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(shape[0], dtype=np.int64)[None, :]


_BN_DROPPED = DropRule("{m}.num_batches_tracked", "batch_stats/{m}/mean", _zeros_int64)

GENERIC = RuleSet(
    name="generic",
    rules=(
        Rule("{m}.running_mean", "batch_stats/{m}/mean"),
        Rule("{m}.running_var", "batch_stats/{m}/var"),
        Rule("{m:(?:[^/]*[./])*[^./]*(?:embed|wte|wpe)[^./]*}.weight", "params/{m}/embedding"),
        Rule("{m}.weight", "params/{m}/kernel", Layout.LINEAR, ndim=2),
        Rule("{m}.weight", "params/{m}/kernel", Layout.CONV, ndim=3),
        Rule("{m}.weight", "params/{m}/kernel", Layout.CONV, ndim=4),
        Rule("{m}.weight", "params/{m}/kernel", Layout.CONV, ndim=5),
        Rule("{m}.weight", "params/{m}/scale", ndim=1),
        Rule("{m}.bias", "params/{m}/bias"),
    ),
    dropped=(_BN_DROPPED,),
)
"""Plain Dense/Conv/LayerNorm/BatchNorm/Embed models: torch ``a.b.weight`` <-> Flax ``params/a/b/...``.

Conventions: module paths keep their names with ``.`` -> ``/``; a 2-D ``weight`` is a Linear kernel unless its module
name contains ``embed``, ``wte`` or ``wpe`` (then an ``nn.Embed`` table); 3/4/5-D weights are convolutions; a 1-D
weight is a LayerNorm/BatchNorm scale; BatchNorm running stats go to the ``batch_stats`` collection.
"""


def bert_rules(head: str = "classifier") -> RuleSet:
    """The ``"bert"`` rule table, taking both Hugging Face BERT layouts.

    * Bare ``BertModel`` keys (``embeddings.word_embeddings.weight``, as all-MiniLM-L6-v2 ships) <-> the
      :class:`mergejax.models.bert.BertModel` tree (``params/embeddings/...``).
    * ``BertFor*`` keys, every encoder key prefixed with ``bert.`` (``bert.embeddings.word_embeddings.weight``) <-> the
      :class:`mergejax.models.bert.BertClassifier` tree (``params/bert/...``); the sequence/token classification head
      ``classifier.{weight,bias}`` <-> ``params/heads/<head>/{kernel,bias}`` (``LINEAR`` layout), so a
      ``BertForSequenceClassification`` checkpoint loads into ``BertClassifier(config, ((head, num_labels),),
      pooling="cls")``.

    Which layout a conversion uses is decided by the keys (or, going back, by the Flax tree) alone, so the reverse puts
    the prefix and the classifier back without any option. Other ``BertFor*`` heads (``cls.predictions.*`` of the
    masked-LM, ``qa_outputs.*`` of question answering) have no rule: strict conversion lists them as unexpected keys,
    ``strict=False`` converts the encoder and leaves them out.

    Args:
      head: the task name of the ``classifier`` head in the Flax tree. Going back to torch, only ``heads/<head>`` is
        written (as ``classifier``); a tree with other heads needs the wanted one renamed to ``head`` first.
    """
    if not head or "/" in head or "{" in head:
        raise ValueError(f"head must be a plain task name (no '/', no braces), got {head!r}")
    layer = "encoder.layer.{i}."
    flayer = "encoder/layer_{i}/"
    pairs: list[tuple[str, str, Layout]] = [
        ("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding", Layout.IDENTITY),
        ("embeddings.position_embeddings.weight", "embeddings/position_embeddings/embedding", Layout.IDENTITY),
        ("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings/embedding", Layout.IDENTITY),
        ("embeddings.LayerNorm.weight", "embeddings/LayerNorm/scale", Layout.IDENTITY),
        ("embeddings.LayerNorm.bias", "embeddings/LayerNorm/bias", Layout.IDENTITY),
    ]
    dense = {
        "attention.self.query": "attention/query",
        "attention.self.key": "attention/key",
        "attention.self.value": "attention/value",
        "attention.output.dense": "attention/output",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
    }
    for t, f in dense.items():
        pairs.append((layer + t + ".weight", flayer + f + "/kernel", Layout.LINEAR))
        pairs.append((layer + t + ".bias", flayer + f + "/bias", Layout.IDENTITY))
    for t, f in {"attention.output.LayerNorm": "attention_norm", "output.LayerNorm": "output_norm"}.items():
        pairs.append((layer + t + ".weight", flayer + f + "/scale", Layout.IDENTITY))
        pairs.append((layer + t + ".bias", flayer + f + "/bias", Layout.IDENTITY))
    pairs.append(("pooler.dense.weight", "pooler/kernel", Layout.LINEAR))
    pairs.append(("pooler.dense.bias", "pooler/bias", Layout.IDENTITY))
    rules = [Rule(t, "params/" + f, layout) for t, f, layout in pairs]  # BertModel
    rules += [Rule("bert." + t, "params/bert/" + f, layout) for t, f, layout in pairs]  # BertFor* encoder
    rules.append(Rule("classifier.weight", f"params/heads/{head}/kernel", Layout.LINEAR))
    rules.append(Rule("classifier.bias", f"params/heads/{head}/bias"))
    anchor = "embeddings/position_embeddings/embedding"
    dropped = (
        DropRule("embeddings.position_ids", "params/" + anchor, _position_ids),
        DropRule("bert.embeddings.position_ids", "params/bert/" + anchor, _position_ids),
    )
    return RuleSet("bert", tuple(rules), dropped)


BERT = bert_rules()
"""Hugging Face ``BertModel`` state dicts <-> :class:`mergejax.models.bert.BertModel` variables, and ``BertFor*``
(``bert.``-prefixed, ``classifier`` head) state dicts <-> :class:`mergejax.models.bert.BertClassifier` variables."""


def _efficientnet_rules() -> RuleSet:
    rules: list[Rule] = [
        Rule("_conv_stem.weight", "params/conv_stem/kernel", Layout.CONV),
        Rule("_conv_head.weight", "params/conv_head/kernel", Layout.CONV),
        Rule("_fc.weight", "params/heads/imagenet/kernel", Layout.LINEAR),
        Rule("_fc.bias", "params/heads/imagenet/bias"),
    ]
    for conv in ("expand_conv", "depthwise_conv", "project_conv"):
        rules.append(Rule("_blocks.{i}._" + conv + ".weight", "params/blocks_{i}/" + conv + "/kernel", Layout.CONV))
    bns = [("_bn0", "params/bn0", "batch_stats/bn0"), ("_bn1", "params/bn1", "batch_stats/bn1")]
    bns += [(f"_blocks.{{i}}._bn{n}", f"params/blocks_{{i}}/bn{n}", f"batch_stats/blocks_{{i}}/bn{n}") for n in range(3)]
    for t, p, s in bns:
        rules += [
            Rule(t + ".weight", p + "/scale"),
            Rule(t + ".bias", p + "/bias"),
            Rule(t + ".running_mean", s + "/mean"),
            Rule(t + ".running_var", s + "/var"),
        ]
    dropped = (
        DropRule("_bn{n:[01]}.num_batches_tracked", "batch_stats/bn{n}/mean", _zeros_int64),
        DropRule("_blocks.{i}._bn{n:[012]}.num_batches_tracked", "batch_stats/blocks_{i}/bn{n}/mean", _zeros_int64),
    )
    return RuleSet("efficientnet_lite0", tuple(rules), dropped)


EFFICIENTNET_LITE0 = _efficientnet_rules()
"""``efficientnet_lite_pytorch.EfficientNet`` (lite0) state dicts <-> :class:`mergejax.models.efficientnet.
EfficientNetLite` variables."""

_REGISTRY: dict[str, RuleSet] = {r.name: r for r in (GENERIC, BERT, EFFICIENTNET_LITE0)}


def register_rules(rules: RuleSet, *, overwrite: bool = False) -> None:
    """Make ``rules`` available by name to :func:`get_rules` and the ``convert`` CLI's ``--arch``."""
    if rules.name in _REGISTRY and not overwrite:
        raise ValueError(f"a rule set named {rules.name!r} is already registered (pass overwrite=True)")
    _REGISTRY[rules.name] = rules


def available_rules() -> Sequence[str]:
    """Names of the registered rule sets."""
    return tuple(sorted(_REGISTRY))


def get_rules(rules: str | RuleSet) -> RuleSet:
    """Look up a rule set by name (``"generic"``, ``"bert"``, ``"efficientnet_lite0"``) or pass one through."""
    if isinstance(rules, RuleSet):
        return rules
    try:
        return _REGISTRY[rules]
    except KeyError:
        raise ValueError(f"unknown rule set {rules!r}; known: {', '.join(available_rules())}") from None
