"""Class labels of a request: ids, or names (with ImageNet's synonyms for the official models).

A model's class names come from its checkpoint or engine directory; the official FlowAR files
carry none, so a model with 1000 classes and no names of its own takes the ImageNet-1k names
shipped here (``imagenet1k.tsv``: every WordNet lemma of each class, e.g. 24 is "great grey owl",
"great gray owl" and "Strix nebulosa"). Names match whatever the case and spacing; a name that
matches nothing is one line naming the closest ones.
"""

from __future__ import annotations

import difflib
import functools
import operator
import re
from pathlib import Path
from typing import Iterable, Sequence

from flowar.errors import FlowARError

IMAGENET_CLASSES = 1000
MAX_PER_CLASS = 10_000          # flowar-run's images per class (one grid, kept in memory until written)


class ClassNames(tuple):
    """The display names, one per class id (the tuple itself: what grids and logs show, e.g.
    "great grey owl"), and every name each class answers to (``synonyms``: per id, the display
    name first)."""

    def __new__(cls, display: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None) -> "ClassNames":
        self = super().__new__(cls, display)
        self.synonyms = tuple(tuple(s) for s in synonyms) if synonyms is not None else tuple((n,) for n in display)
        return self

    @property
    def display(self) -> tuple[str, ...]:
        return tuple(self)

    @classmethod
    def plain(cls, names: Sequence[str]) -> "ClassNames":
        return cls(names)

    @functools.cached_property
    def _index(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for i, names in enumerate(self.synonyms):
            for n in names + (", ".join(names),):        # each lemma, and the full comma-joined label
                ids = out.setdefault(_key(n), [])
                if i not in ids:
                    ids.append(i)
        return {k: tuple(v) for k, v in out.items()}

    def lookup(self, name: str) -> int:
        """The class id a name gives, or a one-line error (unknown: the closest names; ambiguous: the ids)."""
        ids = self._index.get(_key(name))
        if ids is None:
            q = _key(name)
            inside = [k for k in self._index if q and q in k and ", " not in k]       # "grey owl" -> "great grey owl"
            # the names holding it as a word first ("owl" -> "great grey owl", not "howler" or "washbowl"), a
            # class's usual name before another's synonym ("cat" -> "tiger cat", not the red panda's "bear cat")
            whole = re.compile(rf"\b{re.escape(q)}\b")
            usual = {_key(names[0]) for names in self.synonyms if names}
            close = (sorted(inside, key=lambda k: (not whole.search(k), bool(whole.search(k)) and k not in usual, len(k)))
                     + difflib.get_close_matches(q, list(self._index), n=3, cutoff=0.6))
            seen: set[tuple[int, ...]] = set()                # one name per class (its synonyms are one class)
            close = [c for c in close if not (self._index[c] in seen or seen.add(self._index[c]))][:3]
            shown = [self._pretty(c) for c in close]
            raise FlowARError(f"a class name of this model ({len(self)} classes, e.g. "
                              f"{', '.join(self[:3])})", repr(name) if len(name) <= 80 else repr(name[:80]) + "...",
                              f"did you mean {' or '.join(repr(s) for s in shown)}?" if shown
                              else "check the spelling, or pass class ids")
        if len(ids) > 1:
            same = len({self[i] for i in ids}) < len(ids)          # ("crane": the bird 134, the machine 517)
            raise FlowARError("a class name that names one class", f"{name!r}, which names "
                              + "; ".join(f"{i} ({self[i]}" + (": " + SENSES[self[i], i] if same and (self[i], i) in
                                                               SENSES else "") + ")" for i in ids),
                              f"pass its class id: {' or '.join(map(str, ids))}")
        return ids[0]

    def _pretty(self, key: str) -> str:
        for names in self.synonyms:
            for n in names:
                if _key(n) == key:
                    return n
        return key

    def is_one_label(self, text: str) -> bool:
        """Whether ``text`` is a whole name (which may contain commas), not a comma-separated list."""
        return _key(text) in self._index


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def check_names(names: Sequence[str], where: str) -> None:
    """Refuse class names no request could tell apart, where a training run takes them from its
    class folders: two that match as one (names match whatever the case and spacing: folders "Dog"
    and "dog" trained a model whose two classes no name could reach), or an empty one. (A
    checkpoint may hold a name two classes share, as ImageNet's "crane": a request for it is told
    both ids.)"""
    seen: dict[str, str] = {}
    for n in names:
        if not isinstance(n, str) or not _key(n):
            raise FlowARError(f"class names that are non-empty strings ({where})", repr(n)[:60],
                              "name every class (e.g. its folder's name)")
        if _key(n) in seen:
            raise FlowARError(f"class names that differ beyond case and spacing ({where})",
                              f"{seen[_key(n)]!r} and {n!r}", "rename one of them")
        seen[_key(n)] = n


def names_changed(now: Sequence[str], was: Sequence[str], limit: int = 3) -> str:
    """How class list ``now`` differs from ``was``, short whatever their length (1000 ImageNet names
    printed twice were a screenful): the first ids that name another class, and the counts."""
    moved = [f"id {i} {n!r} (was {w!r})" for i, (n, w) in enumerate(zip(now, was)) if n != w]
    parts = moved[:limit] + ([f"{len(moved) - limit} more"] if len(moved) > limit else [])
    if len(now) != len(was):
        parts.append(f"{len(now)} classes, was {len(was)}")
    return ", ".join(parts)


# What tells apart the ImageNet-1k classes whose usual names are the same (WordNet's glosses, shortened):
# "134 (crane); 517 (crane)" told the user nothing
SENSES = {("crane", 134): "the bird", ("crane", 517): "the lifting machine",
          ("maillot", 638): "tights for dancing", ("maillot", 639): "a one-piece swimsuit, tank suit"}


@functools.lru_cache(maxsize=1)
def imagenet() -> ClassNames:
    """The ImageNet-1k classes in id order, each with its WordNet lemmas."""
    rows = [line.split("\t") for line in (Path(__file__).with_name("imagenet1k.tsv")).read_text().splitlines()
            if line and not line.startswith("#")]
    assert len(rows) == IMAGENET_CLASSES and all(int(r[0]) == i for i, r in enumerate(rows))
    synonyms = tuple(tuple(n.strip() for n in r[2].split(", ")) for r in rows)
    return ClassNames(tuple(s[0] for s in synonyms), synonyms)


def class_names_for(num_classes: int, stored: Sequence[str] | None) -> ClassNames | None:
    """The names a model answers to: its own, else ImageNet's for 1000 classes, else none."""
    if stored:
        return ClassNames(stored)
    if num_classes == IMAGENET_CLASSES:
        return imagenet()
    return None


def split_class_names(values: str | Iterable[str], names: ClassNames | None = None) -> list[str]:
    """Names from ``--classes`` values: ``;`` separates names that contain commas; otherwise a
    value that is a whole name stays one (``"great grey owl, great gray owl, Strix nebulosa"``)
    and any other is split on commas (``cat,dog``). The option may be repeated."""
    out = []
    for v in [values] if isinstance(values, str) else list(values):
        if ";" in v:
            parts = v.split(";")
        elif names is not None and names.is_one_label(v):
            parts = [v]
        else:
            parts = v.split(",")
        if not all(p.strip() for p in parts):
            raise FlowARError("class names separated by single commas (or ';')", repr(v), "drop the empty names")
        out += [p.strip() for p in parts]
    return out


def label_ids(items: Sequence[int | str], num_classes: int, names: ClassNames | None) -> list[int]:
    """Class ids from ids and/or names, checked against the model (``names``: ClassNames or a list)."""
    if names is not None and not isinstance(names, ClassNames):
        names = ClassNames.plain(list(names))
    out = []
    for it in items:
        if isinstance(it, bool) or str(getattr(it, "dtype", "")) in ("torch.bool", "bool"):     # (a bool tensor indexes)
            raise FlowARError("class ids (int) or class names (str)", repr(it), "pass e.g. [3, 'cat']")
        if isinstance(it, int) or (hasattr(it, "__index__") and not isinstance(it, str)):
            try:
                # the integer protocol, not int(): int() truncated a 0-d float tensor (1.5 sampled class 1)
                i = operator.index(it)
            except (TypeError, ValueError):         # (a float tensor, a row of a 2-D one)
                raise FlowARError("class ids (int) or class names (str)", repr(it)[:60],
                                  "pass a flat list of integers or names") from None
            if not 0 <= i < num_classes:
                raise FlowARError(f"class ids in 0..{num_classes - 1}", str(i), f"this model has {num_classes} classes")
            out.append(i)
        elif isinstance(it, str):
            if names is None:
                raise FlowARError("class names stored with the model", f"{it!r} for a model without class names",
                                  "pass class ids instead")
            out.append(names.lookup(it))
        else:
            raise FlowARError("class ids (int) or class names (str)", f"{type(it).__name__}", "pass e.g. [3, 'cat']")
    return out


def parse_labels(num_classes: int | None, names: ClassNames | None, labels: str | None = None,
                 classes: str | Iterable[str] | None = None, n_per_class: int = 1) -> list[int]:
    """Class ids from ``--labels 3,7`` or ``--classes cat,dog`` (each repeated n_per_class times);
    neither: the first ten classes. ``num_classes`` None: the lists' form only, checked before the
    model is known (what comes back is then not ids)."""
    if labels is not None and classes:
        raise FlowARError("either --labels or --classes", "both", "pass only one of them")
    if n_per_class < 1:
        raise FlowARError("--n-per-class >= 1", str(n_per_class), "use e.g. --n-per-class 4")
    if n_per_class > MAX_PER_CLASS:         # (the list alone of 10^8 per class filled the memory)
        raise FlowARError(f"--n-per-class at most {MAX_PER_CLASS}", str(n_per_class),
                          "for more images use flowar-sample (shards written as it goes, resumable)")
    if classes:
        ids = split_class_names(classes, names)
    elif labels is not None:
        ids = []
        for s in (s.strip() for s in labels.split(",")):
            try:
                if not (s.isascii() and s.removeprefix("-").isdigit()):     # (int() took 3_0 as 30, Arabic digits)
                    raise ValueError(s)
                ids.append(int(s))
            except ValueError:
                raise FlowARError("comma-separated integer class ids, e.g. --labels 3,7", f"{s!r} in {labels!r}",
                                  "pass integers (or --classes with names)") from None
    else:
        ids = list(range(min(num_classes or 10, 10)))
    if num_classes is None:
        return ids
    ids = label_ids(ids, num_classes, names)
    if not ids:
        raise FlowARError("at least one class", "an empty list", "pass e.g. --labels 3,7")
    return [i for i in ids for _ in range(n_per_class)]
