"""Errors of the data pipeline: each names the file (shard, folder, source) and, where there is
one, the sample key, so a bad example can be found and fixed."""
from __future__ import annotations

from dpldm.errors import InputError


class DataError(InputError, ValueError):
    """Base class: bad data (as opposed to a bug)."""


class SourceError(DataError):
    """A source (built-in set, image folder, .npz) is missing, malformed or holds bad values."""


class ShardError(DataError):
    """A shard folder, shard, index or sample is missing, corrupt, out of date or holds bad values.

    `shard` is the shard file (or folder) and `key` the sample key when the problem is one sample.
    """

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None):
        where = ""
        if shard is not None:
            where += f"{shard}"
        if key is not None:
            where += f" [sample {key!r}]"
        super().__init__(f"{where}: {message}" if where else message)
        self.shard = shard
        self.key = key
        self.reason = message


class AutoencoderMismatchError(ShardError):
    """Latent shards were made with another autoencoder than the one the reader expects."""


class OutputError(DataError):
    """An output folder that must not or cannot be written: a file, the input itself (or inside it,
    or around it), a folder dpldm did not write, no permission, a full disk."""
