"""A shard folder on disk and its two descriptions, both written last (after every shard):

    shard-000000.tar ...   webdataset tars; sample k of the folder has `__key__` "%08d" % k
    index.json             the shard list `wids.ShardListDataset` reads: {"wids_version": 1,
                           "shardlist": [{"url", "nsamples", "filesize", "sha256"}, ...]}
    manifest.json          counts, class histogram, split, source, sample spec, sha256 per shard,
                           (latents) the autoencoder's hash. A folder without it is incomplete.
    .progress.json         only while an import/encode runs: the shards finished so far.

`open_shard_folder` reads and cross-checks them (every shard must have its sha256 recorded);
`ShardFolder.check_shard` compares a shard file with what was indexed (size, optionally sha256)
and names the first broken sample when it differs. `ShardFolder.read_labels` reads one shard's
labels in the same pass that verifies its sha256 (readers check label ranges at open time).
"""
from __future__ import annotations

import hashlib
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dpldm.data.codec import LABEL_EXT, SampleSpec, decode_label, sample_key
from dpldm.data.errors import AutoencoderMismatchError, ShardError
from dpldm.utils.io import atomic_write_text

MANIFEST = "manifest.json"
INDEX = "index.json"
PROGRESS = ".progress.json"
FORMAT_VERSION = 1
KINDS = ("images", "latents")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ShardError(f"{what} missing", shard=str(path))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{what} is not valid JSON ({e})", shard=str(path)) from None


def wids_index(shards: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The wids shard-list descriptor (urls relative to the folder holding index.json)."""
    return {"wids_version": 1, "name": name,
            "shardlist": [{"url": s["name"], "nsamples": s["nsamples"], "filesize": s["filesize"],
                           "sha256": s["sha256"]} for s in shards]}


def class_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


def diagnose_tar(path: Path, members_per_sample: int = 2) -> tuple[str | None, str]:
    """Read a tar with the standard library: (key of the first broken sample or None, what is wrong).
    Our samples have `members_per_sample` members (payload + .cls)."""
    last_key, n, seen = None, 0, 0  # seen: members of last_key read so far
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                key = m.name.split(".", 1)[0]
                data = tf.extractfile(m).read() if m.isreg() else b""
                if m.isreg() and len(data) != m.size:
                    return key, f"member {m.name!r} truncated after {n} intact members"
                seen = seen + 1 if key == last_key else 1
                last_key, n = key, n + 1
            end = tf.offset  # where the members stop; the rest must be end-of-archive zeros
    except (tarfile.TarError, OSError, EOFError) as e:
        broken = last_key if (last_key is not None and seen < members_per_sample) else _next_key(last_key)
        return broken, f"unreadable after {n} intact members ({e}); first incomplete sample {broken!r}"
    with open(path, "rb") as f:
        f.seek(end)
        tail = f.read()
    if tail.strip(b"\0"):
        broken = last_key if (last_key is not None and seen < members_per_sample) else _next_key(last_key)
        return broken, (f"invalid tar header at byte {end} after {n} intact members; "
                        f"first unreadable sample {broken!r}")
    return None, f"tar reads cleanly ({n} members, last sample {last_key!r})"


def _next_key(key: str | None) -> str | None:
    """The key after `key` in a folder written by us (keys are consecutive integers)."""
    if key is None:
        return sample_key(0)
    return sample_key(int(key) + 1) if key.isdigit() else None


@dataclass(frozen=True)
class ShardInfo:
    name: str
    nsamples: int
    first_index: int
    filesize: int
    sha256: str


@dataclass
class ShardFolder:
    path: Path
    manifest: dict[str, Any]
    spec: SampleSpec
    shards: list[ShardInfo]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def num_examples(self) -> int:
        return int(self.manifest["num_examples"])

    @property
    def offsets(self) -> np.ndarray:
        """(num_shards + 1,) cumulative sample counts: shard k holds [offsets[k], offsets[k+1])."""
        return np.concatenate([[0], np.cumsum([s.nsamples for s in self.shards])]).astype(np.int64)

    def shard_path(self, k: int) -> Path:
        return self.path / self.shards[k].name

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, position inside it) of global example `index`."""
        if not (0 <= index < self.num_examples):
            raise IndexError(f"example index {index} outside [0, {self.num_examples})")
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return k, index - self.shards[k].first_index

    def check_shard(self, k: int, verify: str = "size") -> None:
        """Raise ShardError when shard k is missing or differs from the index.
        verify: "size" (stat only), "sha256" (also hash the whole file), "none"."""
        if verify not in ("none", "size", "sha256"):
            raise ValueError(f"verify must be none|size|sha256, got {verify!r}")
        info, path = self.shards[k], self.shard_path(k)
        if verify == "none":
            return
        if not path.is_file():
            raise ShardError("shard file missing", shard=str(path))
        size = path.stat().st_size
        if size != info.filesize:
            key, why = diagnose_tar(path)
            raise ShardError(f"file is {size} bytes but the index says {info.filesize} "
                             f"(truncated, or changed after indexing): {why}", shard=str(path), key=key)
        if verify == "sha256" and sha256_file(path) != info.sha256:
            key, why = diagnose_tar(path)
            raise ShardError(f"sha256 differs from the index (corrupt, or changed after indexing): {why}",
                             shard=str(path), key=key)

    def read_labels(self, k: int) -> np.ndarray:
        """Labels (nsamples,) int64 of shard k in sample order, read in ONE pass over the file that
        also verifies its size and sha256 against the index (payloads are hashed, not decoded).
        Each label is checked to be an integer in [0, spec.num_classes) and the keys to be the
        consecutive keys the index promises; ShardError names the shard and sample otherwise."""
        self.check_shard(k, "size")
        info, path = self.shards[k], self.shard_path(k)
        labels: list[int] = []
        problem: ShardError | None = None  # the first one; raised after the sha256 verdict (a corrupt file says so)
        h = hashlib.sha256()
        with open(path, "rb") as raw:
            reader = _HashingReader(raw, h)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tf:
                    for m in tf:
                        key, _, ext = m.name.partition(".")
                        if ext != LABEL_EXT or not m.isreg():
                            continue
                        expected = sample_key(info.first_index + len(labels))
                        if key != expected:
                            raise ShardError(f"found the label of sample {key!r} where the index expects {expected!r} "
                                             "(index out of date, or a sample is missing)", shard=str(path), key=expected)
                        labels.append(decode_label(tf.extractfile(m).read(), self.spec.num_classes,
                                                   shard=str(path), key=key))
            except ShardError as e:
                problem = e
            except (tarfile.TarError, OSError, EOFError) as e:
                key, why = diagnose_tar(path)
                problem = ShardError(f"unreadable tar ({type(e).__name__}: {e}); {why}", shard=str(path), key=key)
            reader.drain()
        if h.hexdigest() != info.sha256:
            key, why = diagnose_tar(path)
            raise ShardError(f"sha256 differs from the index (corrupt, or changed after indexing): {why}",
                             shard=str(path), key=key)
        if problem is not None:
            raise problem
        if len(labels) != info.nsamples:
            raise ShardError(f"holds {len(labels)} labelled samples but the index says {info.nsamples} "
                             "(index out of date)", shard=str(path), key=sample_key(info.first_index + len(labels)))
        return np.asarray(labels, dtype=np.int64)


class _HashingReader:
    """A read-only file wrapper that feeds every byte read into `h` (one pass: hash while parsing)."""

    def __init__(self, f, h) -> None:
        self.f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.h.update(b)
        return b

    def drain(self, chunk: int = 1 << 22) -> None:
        """Hash the rest of the file (the tar's end-of-archive padding and anything after it)."""
        while self.read(chunk):
            pass


def open_shard_folder(folder: str | Path, expected_ae_hash: str | None = None) -> ShardFolder:
    """Read manifest.json and index.json of a finished import/encode and cross-check them.

    expected_ae_hash: for latent folders, the sha256 of the autoencoder the caller will decode
    with; a folder made by another autoencoder raises AutoencoderMismatchError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError("shard folder not found", shard=str(folder))
    m = read_json(folder / MANIFEST, "manifest (the folder is incomplete: import/encode did not finish)")
    if m.get("format_version") != FORMAT_VERSION or m.get("kind") not in KINDS:
        raise ShardError(f"unsupported manifest (format_version {m.get('format_version')!r}, "
                         f"kind {m.get('kind')!r})", shard=str(folder / MANIFEST))
    try:
        spec = SampleSpec.from_json(m["sample"])
        shards, first = [], 0
        for s in m["shards"]:
            shards.append(ShardInfo(s["name"], int(s["nsamples"]), first, int(s["filesize"]), s["sha256"]))
            first += int(s["nsamples"])
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"malformed manifest ({type(e).__name__}: {e})", shard=str(folder / MANIFEST)) from None
    bad = next((s for s in shards if not (isinstance(s.sha256, str) and _SHA256.fullmatch(s.sha256))), None)
    if bad is not None:
        raise ShardError(f"malformed manifest: shard {bad.name} has no sha256 (got {bad.sha256!r}); every shard's "
                         "sha256 is verified when it is read: re-run the import/encode that wrote the folder",
                         shard=str(folder / MANIFEST))
    if not shards or first == 0:
        raise ShardError("empty shard list: the folder holds no examples", shard=str(folder / MANIFEST))
    if first != int(m["num_examples"]):
        raise ShardError(f"shards hold {first} examples but num_examples is {m['num_examples']}",
                         shard=str(folder / MANIFEST))
    idx = read_json(folder / INDEX, "wids index")
    listed = [(s.get("url"), s.get("nsamples"), s.get("sha256")) for s in idx.get("shardlist", [])]
    if not listed:
        raise ShardError("empty shard list", shard=str(folder / INDEX))
    if listed != [(s.name, s.nsamples, s.sha256) for s in shards]:
        raise ShardError("shard list differs from manifest.json (index out of date)", shard=str(folder / INDEX))
    if expected_ae_hash is not None:
        got = m.get("autoencoder_sha256")
        if m["kind"] != "latents":
            raise AutoencoderMismatchError("expected latent shards, found image shards", shard=str(folder))
        if got != expected_ae_hash:
            raise AutoencoderMismatchError(
                f"latents were encoded by autoencoder {str(got)[:12]}..., not the expected "
                f"{expected_ae_hash[:12]}...: re-run `dpldm data encode` with this autoencoder", shard=str(folder))
    return ShardFolder(folder, m, spec, shards)
