"""Where each dataset's official files come from, declared as TFDS builders declare theirs: a
URL per file with its checksum beside it, and the layout the file unpacks to in the dataset
folder that the builders read (`<data dir>/<dataset>/`).

Checksums: where the dataset's authors (or the indexes that mirror them) publish one, it is
written here and every download is verified against it. Where none is published (DPR's files),
`md2pr_jax.data.fetch` records the sha256 of the first download in the data dir
(`<data dir>/.md2pr_checksums.json`) and verifies later downloads into that data dir against it.
No checksum here is guessed.

Standard library only: the pod launcher imports this on a laptop before any machine exists.
"""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import urlsplit

MIRROR_ENV = "MD2PR_DATA_MIRROR"  # tests and private mirrors: <mirror>/<host>/<path of the official URL>

# Files a dataset folder must hold for its builder to read it (the rest are optional).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "beir": ("corpus.jsonl", "queries.jsonl"),
    "msmarco_passage": ("collection.tsv", "queries.train.tsv", "qrels.train.tsv"),
    "nq_dpr": ("psgs_w100.tsv",),
}


@dataclasses.dataclass(frozen=True)
class Resource:
    """One downloadable file and what it unpacks to.

    kind: 'file' (kept as it is), 'gz' (gunzipped), 'zip' or 'tar.gz' (members extracted).
    files: (member of the archive, path in the dataset folder) pairs; for 'file' and 'gz' the
        one pair ('', name). Empty for an archive: every member under `strip`.
    strip: archive prefix removed from member names (a BEIR zip holds '<name>/...').
    md5 / sha256 / size: the published checksums and byte count ('' / 0 where none is published).
    headers: extra HTTP request headers the host needs.
    """

    url: str
    kind: str
    files: tuple[tuple[str, str], ...] = ()
    strip: str = ""
    md5: str = ""
    sha256: str = ""
    size: int = 0
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def verified(self) -> bool:
        """True when a published checksum is declared (otherwise: recorded on first download)."""
        return bool(self.md5 or self.sha256)

    def location(self, mirror: str | None = None) -> str:
        """The URL to download from: the official one, or its copy under `mirror` (default:
        $MD2PR_DATA_MIRROR) at <mirror>/<host>/<path>."""
        mirror = os.environ.get(MIRROR_ENV, "") if mirror is None else mirror
        if not mirror:
            return self.url
        parts = urlsplit(self.url)
        return f"{mirror.rstrip('/')}/{parts.netloc}{parts.path}"


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """The official files of one dataset, with its homepage and licence for the user to read."""

    builder: str
    resources: tuple[Resource, ...]
    homepage: str
    licence: str

    @property
    def required(self) -> tuple[str, ...]:
        return REQUIRED_FILES[self.builder]

    def with_checksums(self, checksums: dict[str, dict]) -> "DatasetSource":
        """A copy whose resources carry `checksums[filename]` (keys md5/sha256/size) instead:
        for tests that serve small files in the official layout."""
        res = tuple(dataclasses.replace(r, **checksums.get(r.filename, {})) for r in self.resources)
        return dataclasses.replace(self, resources=res)


# --- BEIR ---------------------------------------------------------------------------------
# The md5 column of the BEIR README's dataset table (github.com/beir-cellar/beir, "Available
# Datasets"). Left out: the datasets BEIR does not redistribute (bioasq, signal1m, trec-news,
# robust04) and cqadupstack, whose zip holds twelve forums in sub-folders rather than one
# BEIR folder (the builder reads one).
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
BEIR_MD5 = {
    "msmarco": "444067daf65d982533ea17ebd59501e4",
    "trec-covid": "ce62140cb23feb9becf6270d0d1fe6d1",
    "nfcorpus": "a89dba18a62ef92f7d323ec890a0d38d",
    "nq": "d4d3d2e48787a744b6f6e691ff534307",
    "hotpotqa": "f412724f78b0d91183a0e86805e16114",
    "fiqa": "17918ed23cd04fb15047f73e6c3bd9d9",
    "arguana": "8ad3e3c2a5867cdced806d6503f29b99",
    "webis-touche2020": "46f650ba5a527fc69e0a6521c5a23563",
    "quora": "18fb154900ba42a600f84b839c173167",
    "dbpedia-entity": "c2a39eb420a3164af735795df012ac2c",
    "scidocs": "38121350fc3a4d2f48850f6aff52e4a9",
    "fever": "5a818580227bfb4b35bb6fa46d9b6c03",
    "climate-fever": "8b66f0a9126c521bae2bde127b4dc99d",
    "scifact": "5f7d1de60b170fc8027bb7898e2efca1",
}


def beir(name: str) -> DatasetSource | None:
    """BEIR's zip of dataset `name` (unpacks to corpus.jsonl, queries.jsonl, qrels/<split>.tsv)."""
    if name not in BEIR_MD5:
        return None
    zip_ = Resource(BEIR_URL.format(name=name), "zip", strip=f"{name}/", md5=BEIR_MD5[name])
    return DatasetSource("beir", (zip_,), "https://github.com/beir-cellar/beir", "as the upstream dataset's")


# --- MS MARCO passage ---------------------------------------------------------------------
# collectionandqueries.tar.gz holds the collection, every query file and the train and
# dev.small judgements in one archive; its md5 and size are the ones Anserini's MS MARCO guide
# and ir_datasets publish. The host is the one MS MARCO links to since 2023 (older guides name
# msmarco.blob.core.windows.net); the version header is what ir_datasets sends to this Azure
# host for large files (ranged reads).
MSMARCO_PASSAGE = DatasetSource(
    "msmarco_passage",
    (
        Resource(
            "https://msmarco.z22.web.core.windows.net/msmarcoranking/collectionandqueries.tar.gz",
            "tar.gz",
            files=tuple((f, f) for f in (
                "collection.tsv", "queries.train.tsv", "qrels.train.tsv", "queries.dev.small.tsv", "qrels.dev.small.tsv",
            )),  # fmt: skip
            md5="31644046b18952c1386cd4564ba2ae69",
            size=1_057_717_952,
            headers=(("X-Ms-Version", "2019-12-12"),),
        ),
    ),
    "https://microsoft.github.io/msmarco/",
    "MS MARCO terms (non-commercial research use)",
)

# --- Natural Questions, DPR release -------------------------------------------------------
# The URLs of DPR's own download script (facebookresearch/DPR, dpr/data/download_data.py). DPR
# publishes no checksums: fetch records the sha256 of the first download (see the docstring).
_DPR = "https://dl.fbaipublicfiles.com/dpr"
NQ_DPR = DatasetSource(
    "nq_dpr",
    (
        Resource(f"{_DPR}/wikipedia_split/psgs_w100.tsv.gz", "gz", files=(("", "psgs_w100.tsv"),)),
        Resource(f"{_DPR}/data/retriever/biencoder-nq-train.json.gz", "gz", files=(("", "biencoder-nq-train.json"),)),
        Resource(f"{_DPR}/data/retriever/biencoder-nq-dev.json.gz", "gz", files=(("", "biencoder-nq-dev.json"),)),
        Resource(f"{_DPR}/data/retriever/nq-test.qa.csv", "file", files=(("", "nq-test.qa.csv"),)),
    ),
    "https://github.com/facebookresearch/DPR",
    "see DPR's nq_license files (dl.fbaipublicfiles.com/dpr/nq_license/)",
)


def source_for(builder: str, dataset: str) -> DatasetSource | None:
    """The official source of `builder`/`dataset`, or None where none is known (the files must
    then be put in <data dir>/<dataset>/ by hand). MS MARCO and NQ have one dataset per builder,
    whatever the folder is named."""
    if builder == "beir":
        return beir(dataset)
    return {"msmarco_passage": MSMARCO_PASSAGE, "nq_dpr": NQ_DPR}.get(builder)
