"""Writing and sequentially reading webdataset shard folders.

`FolderWriter` writes one shard at a time with webdataset's `TarWriter` into a temporary name in
the same folder, fsyncs and renames it (a half-written shard never looks complete), records it in
`.progress.json`, and writes `index.json` and `manifest.json` last. A rerun with the same inputs
(same fingerprint) keeps every finished shard whose sha256 still matches and rewrites the rest; a
folder holding a different import is refused unless `overwrite=True`.

`iter_shard(folder, k)` streams one shard in order through webdataset and validates every sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import webdataset as wds

from dpldm.data.codec import SampleSpec, decode_sample, encode_sample, sample_key
from dpldm.data.errors import OutputError, ShardError, SourceError
from dpldm.data.manifest import (FORMAT_VERSION, INDEX, MANIFEST, PROGRESS, ShardFolder,
                                 diagnose_tar, sha256_file, shard_name, wids_index, write_json)
from dpldm.data.outdir import check_output_folder, is_our_tmp, owned_names, writing
from dpldm.data.sources import source_fingerprint, source_path, validate_source
from dpldm.utils.io import atomic_path

TAR_MTIME = 0  # fixed member mtime: the same examples always give byte-identical shards


def write_shard(path: Path, first_index: int, xs: np.ndarray, ys: np.ndarray, ext: str) -> dict[str, Any]:
    """Write examples xs (n, ...) with labels ys (n,) as samples first_index.. into `path`, atomically."""
    with atomic_path(path) as tmp:
        with wds.TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as w:
            for j in range(len(xs)):
                w.write(encode_sample(first_index + j, xs[j], int(ys[j]), ext))
    return {"name": path.name, "nsamples": int(len(xs)), "filesize": path.stat().st_size, "sha256": sha256_file(path)}


@dataclass
class FolderWriter:
    """Writes one shard folder; see the module doc. `inputs` are (flag, path) pairs the folder must
    not equal, lie inside or contain (dpldm.data.outdir). With `overwrite`, a folder holding
    another dpldm import/encode is emptied of exactly the files its record lists (manifest,
    index, progress and the shards it names); nothing else is ever deleted."""
    out: Path
    fingerprint: dict[str, Any]
    overwrite: bool = False
    inputs: Sequence[tuple[str, Any]] = ()
    written: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.out = Path(self.out)
        previous = check_output_folder(self.out, self.inputs)
        created = not self.out.exists()
        with writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
        self._done: dict[str, dict[str, Any]] = {}
        self._owned: set[str] = owned_names(previous)
        try:
            for stale in self.out.iterdir():  # temporary files of a killed run; never a finished file
                if is_our_tmp(stale.name):
                    stale.unlink()
            if previous is not None and previous.get("fingerprint") != self.fingerprint:
                if not self.overwrite:
                    raise SourceError(
                        f"{self.out} already holds a different dataset ({_describe(previous.get('fingerprint'))}); "
                        f"nothing was changed. Choose another folder, or overwrite it (--overwrite)")
                for name in (MANIFEST, INDEX, PROGRESS):  # the folder is incomplete from here on
                    (self.out / name).unlink(missing_ok=True)
                for name in sorted(self._owned):  # only the shards dpldm's record lists
                    (self.out / name).unlink(missing_ok=True)
                self._owned = set()
            elif previous is not None:
                self._done = {str(s["k"]): s for s in previous.get("shards", []) if "k" in s}
        except OSError as e:
            if created:
                _remove_if_empty(self.out)
            raise OutputError(f"{self.out}: cannot prepare the folder ({e.strerror or e})") from None

    def _save_progress(self) -> None:
        with writing(self.out / PROGRESS, self.out):
            write_json(self.out / PROGRESS, {"fingerprint": self.fingerprint, "reserved": sorted(self._owned),
                                             "shards": sorted(self._done.values(), key=lambda s: s["k"])})

    def is_done(self, k: int, nsamples: int) -> bool:
        """Shard k was finished by an earlier run and is still intact (sha256 checked)."""
        rec = self._done.get(str(k))
        path = self.out / shard_name(k)
        ok = (rec is not None and rec["nsamples"] == nsamples and path.is_file()
              and path.stat().st_size == rec["filesize"] and sha256_file(path) == rec["sha256"])
        if ok:
            self.skipped.append(k)
        return ok

    def write(self, k: int, first_index: int, xs: np.ndarray, ys: np.ndarray, ext: str) -> None:
        path = self.out / shard_name(k)
        if path.name not in self._owned:
            if path.exists():
                raise OutputError(f"{path}: exists but dpldm's records in {self.out} do not list it; "
                                  "refusing to replace a file dpldm did not write")
            self._owned.add(path.name)
            self._save_progress()  # recorded before the file appears, so a killed run knows it is ours
        with writing(path, self.out):
            info = write_shard(path, first_index, xs, ys, ext)
        self._done[str(k)] = {"k": k, **info, "class_histogram": np.bincount(ys).tolist(),
                              "example_shape": list(xs.shape[1:]), "dtype": str(xs.dtype)}
        self.written.append(k)
        self._save_progress()

    def record(self, k: int) -> dict[str, Any]:
        return self._done[str(k)]

    def finish(self, num_shards: int, spec: SampleSpec, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        shards = [self._done[str(k)] for k in range(num_shards)]
        hist = np.zeros(spec.num_classes, dtype=np.int64)
        for s in shards:
            h = np.asarray(s["class_histogram"], dtype=np.int64)
            hist[: len(h)] += h
        n = int(sum(s["nsamples"] for s in shards))
        manifest = {
            "format_version": FORMAT_VERSION, "kind": kind, "num_examples": n, "num_shards": num_shards,
            "class_histogram": hist.tolist(), "sample": spec.to_json(), "key_format": "%08d",
            "fingerprint": self.fingerprint, **fields,
            "shards": shards,  # k, name, nsamples, filesize, sha256, class_histogram, example_shape, dtype
        }
        keep = {s["name"] for s in shards}
        with writing(self.out, self.out):
            for name in sorted(self._owned - keep):  # ours, left by an earlier, larger run of this import
                (self.out / name).unlink(missing_ok=True)
        try:
            with writing(self.out / INDEX, self.out):
                write_json(self.out / INDEX, wids_index(shards, name=f"{fields.get('source', '')}:{fields.get('split', '')}"))
            with writing(self.out / MANIFEST, self.out):
                write_json(self.out / MANIFEST, manifest)  # last: its presence marks the folder complete
        except OutputError:
            (self.out / INDEX).unlink(missing_ok=True)  # an index without a manifest would look half-done
            raise
        (self.out / PROGRESS).unlink(missing_ok=True)
        return manifest


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _describe(fp: dict | None) -> str:
    if not fp:
        return "unknown"
    return ", ".join(f"{k}={fp[k]}" for k in ("kind", "source", "split", "format", "shard_size",
                                              "num_examples", "autoencoder_sha256") if k in fp)


@dataclass
class WriteReport:
    manifest: dict[str, Any]
    written: list[int]
    skipped: list[int]


def import_arrays(images: np.ndarray, labels: np.ndarray, meta: dict[str, Any], out: str | Path, *,
                  shard_size: int = 1000, fmt: str = "npy", overwrite: bool = False,
                  on_shard: Callable[[int], None] | None = None) -> WriteReport:
    """Write a validated source (see sources.load_source) as an image shard folder. `out` may not
    be, lie inside or contain the source's own file or folder (meta["source"])."""
    if "num_classes" not in meta:
        raise SourceError("source meta needs num_classes")
    validate_source(images, labels, meta, where=str(meta.get("source", "source")))
    if shard_size < 1:
        raise SourceError(f"shard size must be >= 1, got {shard_size}")
    n = len(images)
    spec = SampleSpec(fmt, images.shape[1:], "uint8", int(meta["num_classes"]))
    # what identifies the shards' bytes (the source's name may be spelled differently on a rerun)
    fingerprint = {"kind": "images", "split": meta.get("split"), "format": fmt,
                   "shard_size": int(shard_size), "num_examples": n, "data_sha256": source_fingerprint(images, labels)}
    src = source_path(str(meta.get("source", ""))) if meta.get("source") else None
    w = FolderWriter(Path(out), fingerprint, overwrite, inputs=[("--source", src)])
    starts = list(range(0, n, shard_size))
    for k, start in enumerate(starts):
        stop = min(n, start + shard_size)
        if not w.is_done(k, stop - start):
            w.write(k, start, images[start:stop], labels[start:stop], fmt)
        if on_shard is not None:
            on_shard(k)
    fields = {"source": str(meta.get("source")), "split": meta.get("split"),
              "num_classes": int(meta["num_classes"]), "class_names": meta.get("class_names"),
              "image_shape": list(images.shape[1:]), "image_dtype": "uint8",
              "source_meta": {k: v for k, v in meta.items() if k not in ("source", "split")}}
    manifest = w.finish(len(starts), spec, "images", fields)
    return WriteReport(manifest, w.written, w.skipped)


def iter_shard(folder: ShardFolder, k: int, verify: str = "size") -> Iterator[tuple[int, np.ndarray, int]]:
    """(global index, example, label) of shard k in order, each validated against the manifest."""
    folder.check_shard(k, verify)
    info, path = folder.shards[k], folder.shard_path(k)
    pipeline = wds.DataPipeline(wds.SimpleShardList([str(path)]), wds.tarfile_to_samples())
    it, j = iter(pipeline), 0
    while True:
        expected = sample_key(info.first_index + j)
        try:
            sample = next(it)
        except StopIteration:
            break
        except Exception as e:  # noqa: BLE001 - tar-level failure: name the shard and the sample
            raise ShardError(f"unreadable tar ({type(e).__name__}: {str(e).split(' @ ')[0]}); "
                             f"{diagnose_tar(path)[1]}", shard=str(path), key=expected) from None
        if j >= info.nsamples:
            raise ShardError(f"more samples than the {info.nsamples} indexed (index out of date)",
                             shard=str(path), key=sample.get("__key__"))
        x, y = decode_sample(sample, folder.spec, shard=str(path), expected_key=expected)
        yield info.first_index + j, x, y
        j += 1
    if j != info.nsamples:
        raise ShardError(f"shard ends after {j} samples but the index says {info.nsamples} "
                         f"(truncated, or index out of date)", shard=str(path), key=sample_key(info.first_index + j))


def read_shard_arrays(folder: ShardFolder, k: int, verify: str = "size") -> tuple[np.ndarray, np.ndarray]:
    """All examples of shard k: (nsamples, *spec.shape), (nsamples,) int64."""
    info = folder.shards[k]
    xs = np.empty((info.nsamples, *folder.spec.shape), dtype=folder.spec.dtype)
    ys = np.empty(info.nsamples, dtype=np.int64)
    for i, x, y in iter_shard(folder, k, verify):
        xs[i - info.first_index], ys[i - info.first_index] = x, y
    return xs, ys


def verify_folder(folder: ShardFolder) -> list[int]:
    """Read and validate every sample and every checksum; return the recounted class histogram."""
    hist = np.zeros(folder.spec.num_classes, dtype=np.int64)
    for k in range(len(folder.shards)):
        for _, _, y in iter_shard(folder, k, verify="sha256"):
            hist[y] += 1
    if hist.tolist() != list(folder.manifest["class_histogram"]):
        raise ShardError("class histogram of the samples differs from manifest.json", shard=str(folder.path))
    return hist.tolist()
