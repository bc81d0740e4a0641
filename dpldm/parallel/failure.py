"""When a multi-rank run loses a peer: one clear line instead of a collective's traceback.

A rank killed on another node, a node that went away, or a cut link between nodes surfaces on
the surviving ranks as an error inside a collective: at once (gloo: "Connection reset by peer",
"Connection closed by peer"; NCCL: a DistBackendError) or, when packets simply stop arriving,
after the process group's timeout (`--collective-timeout`, default 30 min: "Timed out"). The
trainer turns such an error into PeerFailure naming the step it was in, what the run folder
keeps (the newest checkpoint and the privacy journal's executed steps, all accounted again on
resume) and how to continue. Nothing is released by a failed run: the model folder is written
only after the last step.
"""
from __future__ import annotations

import re
from pathlib import Path

from dpldm.errors import DpldmError

# what gloo / NCCL / the TCP store say when a peer or the network is gone
_MARKERS = ("connection reset by peer", "connection closed by peer", "broken pipe", "timed out", "timeout",
            "gloo", "nccl", "socket", "no route to host", "connection refused", "network is unreachable")


class PeerFailure(DpldmError, RuntimeError):
    """A peer rank or the network between ranks failed mid-run: printed as one line, exit 3."""


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer rank or the network fails."""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(exc, (RuntimeError, ConnectionError, TimeoutError, OSError)):
        return False
    text = str(exc).lower()
    return any(m in text for m in _MARKERS)


def short_reason(exc: BaseException) -> str:
    """The backend's message without its source path and advice: 'Read error [10.77.0.2]:50825:
    Connection reset by peer'."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)  # [/path/pair.cc:537]
    text = text.split(". This is typically")[0].split(". Check the logs")[0]
    return text[:200].rstrip(". ")


def describe_run_folder(run_dir: Path | None) -> str:
    """What a resume will continue from: the newest checkpoint and the journal's executed steps."""
    if run_dir is None:
        return "no run folder"
    from dpldm.checkpoint import checkpoint_step, list_step_checkpoints
    from dpldm.privacy.journal import PrivacyJournal

    try:
        folders = list_step_checkpoints(run_dir)  # oldest first
        executed = len(PrivacyJournal(run_dir).records())
    except Exception as e:  # the folder itself is unreadable: say so, do not hide the peer failure
        return f"{run_dir} (unreadable: {e})"
    ckpt = f"checkpoint step {checkpoint_step(folders[-1])}" if folders else "no checkpoint yet"
    return f"{run_dir} keeps {ckpt} and the privacy journal's {executed} executed step(s)"


def peer_failure(exc: BaseException, rank: int, world_size: int, step: int | None, run_dir: Path | None,
                 command: str) -> PeerFailure:
    where = f"in logical step {step}" if step is not None else "during set-up"
    return PeerFailure(
        f"rank {rank} of {world_size} lost the process group {where} ({short_reason(exc)}): a peer rank died or the "
        f"network between the nodes failed. Nothing was released; {describe_run_folder(run_dir)} (every executed "
        f"step is accounted on resume). Run the same {command} command to resume")
