"""Atomic, checksummed checkpoints of the whole outer-loop state.

File layout (``<run>/checkpoints/ckpt-00000042.mpk``): one JSON header line, then the
payload written by ``equinox.tree_serialise_leaves`` (NumPy ``.npy`` records, no pickle).
The header holds the format name and version, the step, the number of ``metrics.jsonl``
lines that belong to this state, and the SHA-256 of the payload. Files are written to a
temporary name, fsynced, then renamed, so a crash never leaves a half-written checkpoint
under a checkpoint name; a damaged file is detected by its checksum and skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import equinox as eqx

from .._errors import MetaplasticError
from .._io import atomic_write

FORMAT = "metaplastic-checkpoint"
VERSION = 1
SUFFIX = ".mpk"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path, state: Any, step: int, info: dict[str, Any], keep: int = 3
) -> Path:
    """Save ``state`` (any pytree of arrays) at ``step``; keep the newest ``keep`` files."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob(f".ckpt-*{SUFFIX}.tmp-*"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, state)
    payload = buf.getvalue()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
        **info,
    }
    path = d / f"ckpt-{step:08d}{SUFFIX}"
    atomic_write(path, json.dumps(header).encode() + b"\n" + payload)
    for old in sorted(d.glob(f"ckpt-*{SUFFIX}"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: Path, like: Any) -> tuple[Any, dict[str, Any]]:
    """Load one checkpoint into the structure of ``like``; raise on any damage."""
    raw = path.read_bytes()
    nl = raw.find(b"\n")
    if nl < 0:
        raise MetaplasticError(f"{path}: truncated checkpoint (no header)")
    try:
        header = json.loads(raw[:nl])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MetaplasticError(f"{path}: corrupt checkpoint header") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise MetaplasticError(f"{path}: not a metaplastic checkpoint")
    if header.get("version") != VERSION:
        raise MetaplasticError(
            f"{path}: checkpoint format version {header.get('version')} is not supported "
            f"(this metaplastic reads version {VERSION})"
        )
    payload = raw[nl + 1 :]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise MetaplasticError(f"{path}: checksum mismatch (truncated or corrupted file)")
    try:
        state = eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
    except Exception as err:  # noqa: BLE001 - any mismatch means the file does not fit
        raise MetaplasticError(
            f"{path}: checkpoint does not match this run's configuration ({err})"
        ) from None
    return state, header


def load_latest(run_dir: Path, like: Any) -> tuple[Any, dict[str, Any]] | None:
    """Newest valid checkpoint, skipping damaged ones with a one-line warning each.

    Returns ``None`` when the run has no checkpoint files at all.
    """
    files = sorted(checkpoint_dir(run_dir).glob(f"ckpt-*{SUFFIX}"), reverse=True)
    if not files:
        return None
    for path in files:
        try:
            return read_checkpoint(path, like)
        except MetaplasticError as err:
            print(f"metaplastic: warning: {err}; trying an older checkpoint", file=sys.stderr)
    raise MetaplasticError(
        f"{checkpoint_dir(run_dir)}: no valid checkpoint left (all {len(files)} damaged); "
        "start the run again"
    )
