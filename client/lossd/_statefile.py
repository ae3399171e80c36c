"""A session's spec and OLS state in one file: ``.npz`` (numpy) or ``.safetensors``.

Both hold the three tensors of :class:`lossd.SessionState` under their own names
(``supervise`` [C, C] float32, ``accumulator`` [C, C] float64, ``counts`` [C] int64,
in the reference module's layout) and one JSON document: the format and its version,
the session's name, its spec and the epoch counters. Neither format runs code on
load (npz is read with ``allow_pickle=False``), so a file from elsewhere is data only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from google.protobuf import json_format

from lossd._spec import SessionSpec
from lossd._types import SessionState
from lossd.v1 import loss_service_pb2 as pb

FORMAT = "lossd.session-state"
VERSION = 1
SUFFIXES = (".npz", ".safetensors")
_TENSORS = ("supervise", "accumulator", "counts")


class StateFileError(ValueError):
    """The file is not a lossd session-state file this version can read."""


def _format_of(path: Path) -> str:
    if path.suffix not in SUFFIXES:
        raise StateFileError(f"{path}: expected a .npz or .safetensors file, got {path.suffix or 'no suffix'!r}")
    return path.suffix[1:]


def write(path: Path, name: str, spec: SessionSpec, state: SessionState) -> None:
    """Write ``state`` of session ``name`` (with ``spec``) to ``path``; the suffix picks the format."""
    kind = _format_of(path)
    meta = json.dumps(
        {
            "format": FORMAT,
            "version": VERSION,
            "session": name,
            "spec": json_format.MessageToDict(spec.to_proto()),  # the proto's JSON, as any client reads it
            "epoch": state.epoch,
            "samples_this_epoch": state.samples_this_epoch,
        }
    )
    tensors = {field: getattr(state, field).detach().cpu().contiguous() for field in _TENSORS}
    if kind == "npz":
        with path.open("wb") as file:  # a file object: savez would add .npz to a name lacking it
            np.savez(file, meta=np.array(meta), **{k: v.numpy() for k, v in tensors.items()})
        return
    save_file = _safetensors().torch.save_file
    save_file(tensors, str(path), metadata={"lossd": meta})


def read(path: Path) -> tuple[str, SessionSpec, SessionState]:
    """(session name, spec, state) from a file written by :func:`write`."""
    kind = _format_of(path)
    try:
        if kind == "npz":
            with np.load(path, allow_pickle=False) as archive:
                meta_text = str(archive["meta"])
                tensors = {field: torch.from_numpy(archive[field].copy()) for field in _TENSORS}
        else:
            with _safetensors().safe_open(str(path), framework="pt") as archive:
                meta_text = (archive.metadata() or {}).get("lossd", "")
                tensors = {field: archive.get_tensor(field) for field in _TENSORS}
    except (OSError, KeyError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise StateFileError(f"{path}: no such file") from None
        raise StateFileError(f"{path}: not a lossd session-state file ({type(error).__name__}: {error})") from None
    meta = _meta(path, meta_text)
    try:
        spec = SessionSpec.from_proto(json_format.ParseDict(meta["spec"], pb.SessionSpec()))
        state = SessionState(
            epoch=int(meta["epoch"]),
            supervise=tensors["supervise"],
            accumulator=tensors["accumulator"],
            counts=tensors["counts"],
            samples_this_epoch=int(meta["samples_this_epoch"]),
        )
    except (KeyError, TypeError, ValueError, json_format.ParseError) as error:
        raise StateFileError(f"{path}: malformed lossd metadata ({error})") from None
    return str(meta.get("session", "")), spec, state


def _meta(path: Path, text: str) -> dict[str, Any]:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateFileError(f"{path}: not a lossd session-state file (no {FORMAT} metadata)")
    if meta.get("version") != VERSION:
        raise StateFileError(f"{path}: format version {meta.get('version')!r}; this lossd reads version {VERSION}")
    return meta


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError:
        raise StateFileError("the .safetensors format needs the safetensors package: pip install safetensors") from None
    return safetensors
