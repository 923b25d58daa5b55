"""Captions: z-scored descriptors -> sentences (the synthetic fMRI-text pairs).

Each descriptor family has several paraphrase templates with a ``{dir}`` slot. The word in that
slot always follows the sign of z: ``pos`` words for z >= +1, ``neg`` words for z <= -1, and the
``typ`` phrase in between; ``markedly`` is added at |z| >= 2. (fMRI-LM's public code called high
modularity "reduced"; here the modularity words are tested against the sign.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

STRONG, MARKED = 1.0, 2.0


@dataclass(frozen=True)
class Family:
    pattern: str  # regex on the descriptor name; named groups fill the templates
    pos: str
    neg: str
    typ: str
    templates: tuple[str, ...]


def _net(name: str) -> str:
    """CamelCase network name -> words ('DefaultMode' -> 'default-mode')."""
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", name).lower().split()
    return "-".join(words) if name in ("DefaultMode",) else " ".join(words)


FAMILIES = [
    Family(r"fc\.within\.(?P<a>[^.~]+)", "stronger", "weaker", "typical",
           ("{dir} within-network connectivity of the {a} network", "{dir} coupling among regions of the {a} network",
            "{dir} internal synchrony of the {a} network")),
    Family(r"fc\.between\.(?P<a>[^~]+)~(?P<b>.+)", "stronger", "weaker", "typical",
           ("{dir} coupling between the {a} and {b} networks", "{dir} functional connectivity between {a} and {b} regions",
            "{dir} {a}-{b} connectivity")),
    Family(r"fc\.partial_within\.(?P<a>.+)", "stronger", "weaker", "typical",
           ("{dir} direct (partial) connectivity within the {a} network", "{dir} partial correlation among {a} regions")),
    Family(r"grad\.G(?P<k>\d)\.range", "a wider", "a narrower", "a typical",
           ("{dir} range of connectivity gradient {k}", "{dir} spread along the G{k} connectivity gradient")),
    Family(r"grad\.G(?P<k>\d)\.variance", "more", "less", "typical",
           ("{dir} variance along connectivity gradient {k}", "{dir} dispersion of regions on gradient G{k}")),
    Family(r"grad\.G(?P<k>\d)\.(?P<a>[^.]+)", "higher than usual", "lower than usual", "as usual",
           ("the {a} network positioned {dir} on gradient {k}", "{a} regions sitting {dir} along connectivity gradient {k}")),
    Family(r"ica\.amplitude\.IC\d+-(?P<a>.+)", "higher", "lower", "typical",
           ("{dir} amplitude of the {a}-dominated independent component", "{dir} fluctuation amplitude in a {a} component")),
    Family(r"ica\.variability\.IC\d+-(?P<a>.+)", "higher", "lower", "typical",
           ("{dir} temporal variability of a {a} component", "{dir} moment-to-moment variability in a {a} component")),
    Family(r"ica\.band_ratio\.IC\d+-(?P<a>.+)", "more", "less", "typically",
           ("{dir} low-frequency dominated activity in a {a} component", "a {a} component with {dir} slow-wave dominance")),
    Family(r"ica\.fnc\.IC(?P<i>\d+)-(?P<a>[^~]+)~IC(?P<j>\d+)-(?P<b>.+)", "stronger", "weaker", "typical",
           ("{dir} functional network connectivity between the {a} (IC{i}) and {b} (IC{j}) components",
            "{dir} coupling of the {a} (IC{i}) and {b} (IC{j}) independent components")),
    Family(r"falff\.(?P<a>.+)", "higher", "lower", "typical",
           ("{dir} fractional low-frequency amplitude (fALFF) in the {a} network", "{dir} fALFF of {a} regions")),
    Family(r"graph\.strength\.(?P<a>.+)", "higher", "lower", "typical",
           ("{dir} connection strength of the {a} network", "{dir} nodal strength in {a} regions")),
    Family(r"graph\.modularity", "higher", "lower", "typical",
           ("{dir} modularity, i.e. a {seg} network organisation", "{dir} modular segregation of brain networks ({seg})")),
    Family(r"graph\.global_efficiency", "higher", "lower", "typical",
           ("{dir} global efficiency of the functional network", "{dir} network-wide integration (global efficiency)")),
    Family(r"graph\.clustering", "higher", "lower", "typical",
           ("{dir} local clustering of functional connections", "{dir} average clustering coefficient")),
    Family(r"graph\.participation", "higher", "lower", "typical",
           ("{dir} participation of regions across networks", "{dir} between-network participation")),
]
SEGREGATION = {"pos": "more segregated", "neg": "less segregated, more integrated", "typ": "typically segregated"}
FRAMES = ("This scan shows {items}.", "Compared with the reference cohort, the scan has {items}.",
          "Notable features: {items}.", "The functional connectome displays {items}.")


def direction(z: float) -> str:
    """``pos``, ``neg`` or ``typ`` for a z-score."""
    return "pos" if z >= STRONG else "neg" if z <= -STRONG else "typ"


def family_of(name: str) -> tuple[Family, dict[str, str]]:
    """The template family of a descriptor name and its captured fields."""
    for fam in FAMILIES:
        m = re.fullmatch(fam.pattern, name)
        if m:
            return fam, {k: (_net(v) if k in ("a", "b") else v) for k, v in m.groupdict().items()}
    raise KeyError(f"no caption template for descriptor {name!r}")


def phrase(name: str, z: float, variant: int = 0) -> str:
    """One descriptor as a phrase; the direction word always matches the sign of ``z``."""
    fam, fields = family_of(name)
    d = direction(z)
    word = {"pos": fam.pos, "neg": fam.neg, "typ": fam.typ}[d]
    if d != "typ" and abs(z) >= MARKED:
        word = f"a markedly {word[2:]}" if word.startswith("a ") else f"markedly {word}"
    template = fam.templates[variant % len(fam.templates)]
    return template.format(dir=word, seg=SEGREGATION[d], **fields)


def caption(z: dict[str, float], rng: np.random.Generator, n: int = 4) -> tuple[str, list[str]]:
    """A caption from ``n`` descriptors sampled with probability growing with z^2, so unusual
    features dominate and typical ones fill in.

    Returns ``(text, descriptor names used)``.
    """
    names = [k for k, v in z.items() if np.isfinite(v)]
    if not names:
        return "No descriptor could be computed for this scan.", []
    weight = np.array([z[k] ** 2 + 0.05 for k in names])
    chosen = list(rng.choice(names, size=min(n, len(names)), replace=False, p=weight / weight.sum()))
    items = [phrase(k, z[k], int(rng.integers(8))) for k in chosen]
    joined = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    text = FRAMES[int(rng.integers(len(FRAMES)))].format(items=joined)
    return text[0].upper() + text[1:], [str(c) for c in chosen]


def captions_for_scan(scan_id: str, z: dict[str, float], seed: int, per_scan: int = 3, n: int = 4) -> list[dict]:
    """``per_scan`` seeded captions of one scan (rows of the ``captions`` table)."""
    import hashlib

    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(scan_id.encode()).digest()[:4], "big")])
    rows = []
    for i in range(per_scan):
        text, used = caption(z, rng, n)
        rows.append({"scan_id": scan_id, "caption_index": i, "caption": text, "descriptors": used})
    return rows
