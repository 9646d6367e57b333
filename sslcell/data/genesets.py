"""Gene programmes (gene sets) for gene-programme masking: GMT reading, a shipped example set, gene indexing.

The shipped ``resources/example_programmes.gmt`` is a small set of human gene symbols written for sslcell from
facts in published papers and widely used marker genes, not a copy of a curated database (no MSigDB content).
Each line's description column gives its provenance:

* ``TIROSH2016_S_PHASE``, ``TIROSH2016_G2M_PHASE``: the S and G2/M genes of Tirosh et al., Science 352:189
  (2016) (as in Kowalczyk et al., Genome Res. 25:1860, 2015), with the current symbols of renamed genes added
  (MLF1IP = CENPU, FAM64A = PIMREG, HN1 = JPT1).
* ``RIBOSOMAL_LARGE_SUBUNIT`` / ``RIBOSOMAL_SMALL_SUBUNIT``: cytosolic ribosomal protein genes (RPL* / RPS*).
* ``MITOCHONDRIAL_ENCODED``: the 13 protein-coding genes and 2 rRNAs of the mitochondrial genome (MT-*).
* Lineage marker sets (T, NK, B, plasma, monocyte/myeloid, platelet, erythroid, epithelial, fibroblast,
  endothelial, smooth muscle): canonical markers used throughout single-cell atlases.
* ``INTERFERON_RESPONSE``: well-known interferon-stimulated genes; ``HEAT_SHOCK``: heat-shock protein genes;
  ``DISSOCIATION_IMMEDIATE_EARLY``: immediate-early genes induced by tissue dissociation
  (van den Brink et al., Nat. Methods 14:935, 2017); ``HYPOXIA``: well-known HIF target genes.

Matching is case-insensitive by default, so mouse symbols (``Mki67``, ``mt-Co1``) match the human ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from sslcell._warn import warn_user
from sslcell.errors import ConfigError, FileFormatError, GeneMismatchError

EXAMPLE_GMT = "example_programmes.gmt"


def read_gmt(path: str | Path) -> dict[str, list[str]]:
    """Read a GMT file: one gene set per line, ``name <TAB> description <TAB> gene <TAB> gene ...``.

    Blank lines and lines starting with ``#`` are skipped; empty gene fields (trailing tabs) are ignored and
    duplicate genes within a set are dropped (first occurrence kept).

    Returns:
        ``{set name: [genes]}`` in file order.
    Raises:
        FileFormatError: with the path and line number, for a line with fewer than three fields, an empty name,
            a set without genes, a repeated set name, undecodable text, or a file without any set.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise FileFormatError(f"{path}: not UTF-8 text, so not a GMT file ({err.reason} at byte {err.start})") from None
    sets: dict[str, list[str]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        where = f"{path}, line {lineno}"
        if len(fields) < 3:
            raise FileFormatError(
                f"{where}: expected 'name<TAB>description<TAB>genes...', found {len(fields)} tab-separated field(s)"
            )
        name = fields[0].strip()
        genes = list(dict.fromkeys(g.strip() for g in fields[2:] if g.strip()))
        if not name:
            raise FileFormatError(f"{where}: empty gene-set name")
        if not genes:
            raise FileFormatError(f"{where}: gene set {name!r} lists no genes")
        if name in sets:
            raise FileFormatError(f"{where}: gene set {name!r} appears a second time")
        sets[name] = genes
    if not sets:
        raise FileFormatError(f"{path}: no gene sets found (empty file?)")
    return sets


def example_programmes() -> dict[str, list[str]]:
    """The shipped example programmes (human symbols; provenance in the module docstring and the GMT)."""
    resource = resources.files(__package__).joinpath("resources", EXAMPLE_GMT)
    with resources.as_file(resource) as path:
        return read_gmt(path)


def programme_index(
    programmes: dict[str, list[str]],
    genes: Sequence[str],
    *,
    case_sensitive: bool = False,
    min_size: int = 3,
) -> tuple[list[str], list[np.ndarray]]:
    """Map programmes onto a gene list; keep those with at least ``min_size`` genes present.

    A gene name repeated in ``genes`` (or repeated up to case) maps to its first position.

    Returns:
        The kept programme names (input order) and, for each, the sorted int64 indices into ``genes``.
        How many programmes were dropped, and which, is logged at WARNING level.
    Raises:
        GeneMismatchError: when no programme keeps ``min_size`` genes (e.g. other species or gene IDs).
    """
    if min_size < 1:
        raise ConfigError(f"min_size: must be >= 1, got {min_size}")
    key = (lambda s: s) if case_sensitive else (lambda s: s.casefold())
    position: dict[str, int] = {}
    for j, gene in enumerate(genes):
        position.setdefault(key(str(gene)), j)
    names, index, dropped = [], [], []
    for name, members in programmes.items():
        idx = np.unique([position[k] for k in map(key, members) if k in position]).astype(np.int64)
        if len(idx) >= min_size:
            names.append(name)
            index.append(idx)
        else:
            dropped.append(f"{name} ({len(idx)}/{len(members)})")
    if programmes and not names:
        raise GeneMismatchError(
            f"none of {len(programmes)} gene programmes has >= {min_size} genes among the {len(genes)} genes given "
            f"(first genes: {list(genes[:3])}); check species, symbols vs. IDs, or case_sensitive"
        )
    if dropped:
        warn_user(f"programme_index: dropped {len(dropped)} of {len(programmes)} programmes with < {min_size} genes "
                  f"present: {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}")
    return names, index
