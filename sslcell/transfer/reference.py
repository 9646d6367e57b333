"""A labelled reference for label transfer: a faiss index over its embeddings ``(N, D)``, its labels ``(N,)`` and
the identity of the model that embedded it; built once, saved, and searched by many queries.

Index kinds (``kind="auto"`` picks ``"exact"`` up to :data:`APPROX_ABOVE` reference cells, else ``"ivf"``):

* ``"exact"``: a flat faiss index (brute force, exact).
* ``"ivf"``: a faiss inverted file whose lists hold 8-bit scalar codes of the residuals (SQ8): ``nlist =
  round(sqrt(N))`` k-means lists trained (seed 0) on at most ``64 * nlist`` reference cells; each query searches
  ``nprobe = 48`` lists whatever N and takes its ``2 k`` nearest cells there by the codes as candidates, re-scored
  exactly from the float32 vectors. Fast to build. Settings: :data:`IVF` (:class:`IVFSettings`).
* ``"hnsw"``: a faiss HNSW graph (``M=32`` links per node, ``efConstruction=80``, ``efSearch=max(128, 4 k)``);
  slower to build on a CPU.

Why these IVF settings (benchmarks/results/transfer_ivf_validation.md, made by benchmarks/tune_transfer_ivf.py): they
were chosen on data harder than the speed benchmark's, at 1,000,000 cells (overlapping anisotropic clusters with 16
latent dimensions and 10% random labels, exact-kNN accuracy 0.73; Chula RBC, Jurkat IFC and mouse-bladder embeddings
upsampled to 1,000,000 cells) and at 200,000. There the 15-neighbour vote agrees with exact search on >= 0.991 of
the queries (recall@15 0.98-0.99), against >= 0.981 for the previous default (float32 lists, ``nprobe = max(32,
nlist // 16)``: 62 lists at 1,000,000 cells, 32 at 200,000), in 0.4-0.7 of its search CPU time at 1,000,000 cells.
The codes make a list scan cheaper (a quarter of the memory traffic); fetching ``2 k`` candidates makes up for their
error (with ``k``, recall@15 drops by 0.01-0.04); as the lists grow like ``sqrt(N)``, recall at a fixed ``nprobe``
stays about constant in N (0.979 at both 200,000 and 1,000,000 cells with 32 lists), so nprobe need not grow with
nlist. Lists of ``2 sqrt(N)`` about matched this recall with less search time but twice the build time. Limit: on a
near-isotropic 64-dimensional blob of overlapping clusters (no low-dimensional structure, unlike embeddings) no IVF
setting tried reached 0.97 agreement (this one 0.94 at 1,000,000 cells and 0.93 at 200,000; the previous default
0.95 and 0.90); use ``kind="exact"`` for such data.

Approximate kinds find candidates approximately; their distances are exact (re-scored from the vectors, as the
exact index does). Saved as a folder: ``index.faiss`` (faiss's own format, approximate kinds only),
``vectors.npy`` and ``labels.npy`` (``allow_pickle=False``) and ``reference.json``, which records the settings and
a sha256 of the vectors, labels, index file and settings: files edited or mixed from two references are refused on
load, as is (in a reference saved before the digest) an ``index.faiss`` of another kind, size or metric. Nothing in
it executes code on load.
A reference saved with the previous IVF default (float32 lists) loads and is searched with the settings above.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from sslcell.checkpoint import check_free_files
from sslcell.errors import ConfigError, FileFormatError, InputError
from sslcell.transfer.knn import _METRICS, Metric, _as_float32, _ExactIndex

APPROX_ABOVE = 200_000  # reference cells above which kind="auto" builds an IVF index
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
FORMAT_VERSION = 1
Kind = Literal["auto", "exact", "ivf", "hnsw"]
KINDS = ("auto", "exact", "ivf", "hnsw")
FILES = ("reference.json", "vectors.npy", "labels.npy", "index.faiss")  # what save writes (exact: no index.faiss)


class _HNSWIndex(_ExactIndex):
    """Approximate candidates from a faiss HNSW graph; distances re-scored exactly from the stored vectors."""

    def _build(self, x: np.ndarray) -> faiss.Index:
        index = faiss.IndexHNSWFlat(x.shape[1], HNSW_M, self._faiss_metric)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(x)
        return index

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.hnsw.efSearch = max(HNSW_EF_SEARCH, 4 * k)
        return super().search(q, k)


@dataclass(frozen=True)
class IVFSettings:
    """How an IVF reference is built and searched; :data:`IVF` holds the defaults (see the module doc)."""

    codec: Literal["flat", "sq8"] = "sq8"  # the inverted lists hold float32 vectors, or 8-bit scalar codes
    lists_per_sqrt_n: float = 1.0  # nlist = round(lists_per_sqrt_n * sqrt(N))
    train_per_list: int = 64  # k-means (seed 0) is trained on at most train_per_list * nlist reference cells
    min_nprobe: int = 48  # lists searched per query ...
    probe_divisor: int | None = None  # ... or nlist // probe_divisor where that is more (None: never)
    candidates_per_neighbour: int = 2  # candidates re-scored exactly per neighbour asked for

    def nlist(self, n: int) -> int:
        return max(1, min(n, int(round(self.lists_per_sqrt_n * np.sqrt(n)))))

    def nprobe(self, nlist: int) -> int:
        return min(nlist, max(self.min_nprobe, nlist // self.probe_divisor if self.probe_divisor else 0))


IVF = IVFSettings()  # the defaults, chosen in benchmarks/results/transfer_ivf_validation.md


class _IVFIndex(_ExactIndex):
    """Approximate candidates from a faiss inverted file; distances re-scored exactly from the stored vectors."""

    settings: IVFSettings = IVF

    def _build(self, x: np.ndarray) -> faiss.Index:
        n, d = x.shape
        nlist = self.settings.nlist(n)
        self._quantizer = super()._build(x[:0])  # an empty flat index; faiss does not own it: kept alive here
        if self.settings.codec == "flat":
            index = faiss.IndexIVFFlat(self._quantizer, d, nlist, self._faiss_metric)
        else:
            index = faiss.IndexIVFScalarQuantizer(self._quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                                  self._faiss_metric)
        index.cp.seed = 0
        sample = np.random.default_rng(0).choice(n, min(n, self.settings.train_per_list * nlist), replace=False)
        index.train(x[np.sort(sample)])
        index.add(x)
        return index

    def _n_candidates(self, k: int) -> int:
        return self.settings.candidates_per_neighbour * k

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.index.nprobe = self.settings.nprobe(self.index.nlist)
        return super().search(q, k)


class ReferenceIndex:
    """Labelled reference embeddings ``(N, D)`` behind a faiss index; see the module doc for the kinds."""

    def __init__(self, embedding, labels, *, kind: Kind = "auto", metric: Metric = "euclidean",
                 model: str | None = None, use_rep: str = "X_sslcell", batch_size: int = 8192,
                 model_id: str | None = None, label_key: str | None = None,
                 classes: Sequence[str] | None = None) -> None:
        x = _as_float32(embedding, "reference embedding")
        labels = np.asarray(labels).astype(str)
        if labels.shape != (x.shape[0],):
            raise InputError(f"reference labels have shape {labels.shape}; expected ({x.shape[0]},)")
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}; got {kind!r}")
        self.kind = ("ivf" if x.shape[0] > APPROX_ABOVE else "exact") if kind == "auto" else kind
        self.classes, self.codes = _class_codes(labels, classes)
        if len(self.classes) < 2:
            raise InputError(f"the reference holds a single class ({str(self.classes[0])!r}): nothing to transfer")
        self.metric, self.model, self.use_rep = metric, model, use_rep
        self.model_id = model_id  # checkpoint.model_id of the model that embedded it, where recorded
        self.label_key = label_key  # the obs column its labels came from, where known
        self._index = _INDEXES[self.kind](x, metric, batch_size)

    @property
    def n(self) -> int:
        return int(self._index.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self._index.x.shape[1])

    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances and reference rows ``(M, k)`` of the ``k`` nearest reference cells to ``query`` ``(M, D)``."""
        q = _as_float32(query, "query embedding")
        if q.shape[1] != self.dim:
            raise InputError(f"query embeddings have {q.shape[1]} dimensions, the reference's {self.dim}: were both "
                             "embedded by the same model?")
        if not 1 <= k <= self.n:
            raise InputError(f"n_neighbors={k} but the reference holds {self.n} cells")
        return self._index.search(q, k)

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the reference into ``directory`` (created): reloadable with :meth:`load`. A reference already saved
        there is replaced only with ``overwrite=True``."""
        directory = Path(directory)
        check_free_files(directory, FILES, overwrite)
        directory.mkdir(parents=True, exist_ok=True)
        x, offset = self._index.x, self._index.offset  # euclidean vectors are stored centred: undo it
        vectors, labels = (x if offset is None else x + offset), self.classes[self.codes]
        np.save(directory / "vectors.npy", vectors)
        np.save(directory / "labels.npy", labels)
        index_bytes = None
        if self.kind != "exact":  # serialised once: written, and hashed into the digest
            index_bytes = faiss.serialize_index(self._index.index).tobytes()
            (directory / "index.faiss").write_bytes(index_bytes)
        else:  # an earlier (replaced) approximate reference's index would be left behind
            (directory / "index.faiss").unlink(missing_ok=True)
        meta = {"format_version": FORMAT_VERSION, "kind": self.kind, "metric": self.metric, "model": self.model,
                "model_id": self.model_id, "use_rep": self.use_rep, "label_key": self.label_key, "n": self.n,
                "dim": self.dim, "classes": [str(c) for c in self.classes]}
        meta["sha256"] = _content_digest(meta, vectors, labels, index_bytes)
        (directory / "reference.json").write_text(json.dumps(meta, indent=1))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceIndex:
        """A reference written by :meth:`save`; vectors and labels are read with ``allow_pickle=False``."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "reference.json").read_text())
            vectors = np.load(directory / "vectors.npy", allow_pickle=False)
            labels = np.load(directory / "labels.npy", allow_pickle=False)
        except FileNotFoundError as err:
            raise FileFormatError(f"{directory}: not an sslcell reference ({err.filename} is missing)") from None
        except (ValueError, OSError) as err:
            raise FileFormatError(f"{directory}: cannot read the reference ({err})") from None
        where = directory / "reference.json"
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            raise FileFormatError(f"{where}: not a reference this sslcell reads")
        missing = [k for k in ("kind", "metric", "model", "use_rep", "n", "dim") if k not in meta]
        if missing:
            raise FileFormatError(f"{where}: missing {missing}")
        if meta["kind"] not in _INDEXES:
            raise FileFormatError(f"{where}: unknown index kind {meta['kind']!r}")
        if meta["metric"] not in _METRICS:
            raise FileFormatError(f"{where}: unknown metric {meta['metric']!r}; known: {list(_METRICS)}")
        if vectors.ndim != 2 or vectors.shape != (meta["n"], meta["dim"]):
            raise FileFormatError(f"{directory}: vectors.npy {vectors.shape} does not match reference.json "
                                  f"(n {meta['n']}, dim {meta['dim']})")
        if labels.shape != (meta["n"],):
            raise FileFormatError(f"{directory}: labels.npy {labels.shape} does not match the {meta['n']} vectors")
        index_bytes = None
        if meta["kind"] != "exact":
            try:
                index_bytes = (directory / "index.faiss").read_bytes()
            except OSError as err:
                raise FileFormatError(f"{directory}: cannot read the reference ({err})") from None
        if "sha256" in meta and meta["sha256"] != _content_digest(meta, vectors, labels, index_bytes):  # since 0.2
            raise FileFormatError(f"{directory}: its files (vectors.npy, labels.npy, index.faiss, reference.json) do "
                                  "not match the digest "
                                  "recorded when the reference was saved (edited, or files of another reference); "
                                  "build and save it again from its AnnData")
        out = cls.__new__(cls)
        out.kind, out.metric, out.model, out.use_rep = meta["kind"], meta["metric"], meta["model"], meta["use_rep"]
        out.model_id = meta.get("model_id")  # absent in references saved before sslcell recorded it
        out.label_key = meta.get("label_key")
        try:  # in the order saved (the reference column's categories), where recorded
            out.classes, out.codes = _class_codes(labels.astype(str), meta.get("classes"))
        except InputError as err:
            raise FileFormatError(f"{directory}: labels.npy and reference.json's classes differ ({err})") from None
        if len(out.classes) < 2:
            raise FileFormatError(f"{directory}: labels.npy holds a single class ({str(out.classes[0])!r}): nothing to "
                                  "transfer")
        try:  # the index from the bytes the digest was checked on (the file is read once)
            index = None if index_bytes is None else faiss.deserialize_index(np.frombuffer(index_bytes, np.uint8))
            if index is not None:
                _check_index(index, out.kind, meta)
            out._index = _INDEXES[out.kind](_as_float32(vectors, "reference vectors"), out.metric, 8192, index=index)
        except (ConfigError, InputError, RuntimeError) as err:  # a bad metric; faiss: a missing or corrupt index
            raise FileFormatError(f"{directory}: cannot read the reference ({err})") from None
        return out


def _check_index(index: faiss.Index, kind: str, meta: dict) -> None:
    """A loaded ``index.faiss`` is the kind, size and metric ``reference.json`` says (a file copied from another
    reference would search other cells, or fail mid-search)."""
    expected = {"ivf": faiss.IndexIVF, "hnsw": faiss.IndexHNSW}[kind]
    metric = faiss.METRIC_L2 if meta["metric"] == "euclidean" else faiss.METRIC_INNER_PRODUCT
    found = (f"a {type(index).__name__} of {index.ntotal} x {index.d} vectors, metric "
             f"{'L2' if index.metric_type == faiss.METRIC_L2 else 'inner product'}")
    if (not isinstance(index, expected) or index.ntotal != meta["n"] or index.d != meta["dim"]
            or index.metric_type != metric):
        raise InputError(f"index.faiss holds {found}; reference.json says a {kind} index of {meta['n']} x "
                         f"{meta['dim']}, metric {meta['metric']}")


def _class_codes(labels: np.ndarray, classes: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """The classes present in ``labels`` ``(N,)`` in the order of ``classes`` (sorted where None), and each label's
    position among them ``(N,)``."""
    present, inverse = np.unique(labels, return_inverse=True)
    if classes is None:
        return present, inverse
    known = set(present)
    order = [str(c) for c in dict.fromkeys(classes) if str(c) in known]
    missing = sorted(known - set(order))
    if missing:
        raise InputError(f"labels {missing[:3]} are not among the classes given")
    rank = np.asarray([order.index(c) for c in present], dtype=np.int64)  # sorted class -> its place in the order
    return np.asarray(order, dtype=present.dtype), rank[inverse]


def _content_digest(meta: dict, vectors: np.ndarray, labels: np.ndarray, index_bytes: bytes | None) -> str:
    """sha256 of what decides a transfer: the vectors, the labels (fixed-width, so no two arrays read alike), the
    faiss index's file and the settings recorded beside them."""
    h = hashlib.sha256()
    settings = {k: meta.get(k) for k in ("kind", "metric", "model", "model_id", "use_rep", "label_key", "n", "dim",
                                         "classes")}
    labels = np.ascontiguousarray(np.asarray(labels).astype(str))
    h.update(json.dumps({**settings, "labels_dtype": labels.dtype.str}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(vectors, dtype=np.float32))  # the buffer itself, not a copy
    h.update(labels)
    h.update(index_bytes or b"")
    return h.hexdigest()


_INDEXES = {"exact": _ExactIndex, "ivf": _IVFIndex, "hnsw": _HNSWIndex}
