"""The checkpoint file: plain data only, loaded with ``weights_only=True``, checksummed.

``checkpoint.pt`` is an ordinary ``torch.save`` zip file of the training state (trainable
weights, optimizer, scheduler, loss balancing, index, step and data cursor, the
configuration as a dict of plain values, data fingerprints, RNG states as tensors / ints /
floats, plus ``"format"`` and ``"version"`` markers) whose zip *comment* is a trailer::

    b"rag-kernels.cotrain.checkpoint v2 sha256 " + <64 hex digits>

the SHA-256 of every byte of the file before the digest (so every byte is covered: a flip
anywhere is detected). ``torch.load`` still reads the file (zip readers allow a comment).

Reading (:func:`read_checkpoint`) first verifies the trailer and the digest, and only then
unpickles with ``torch.load(..., weights_only=True)``: a file holding anything but tensors
and plain data (a crafted pickle whose ``__reduce__`` would run code, numpy objects, ...) is
refused and nothing in it runs. Every failure (empty, truncated, corrupt, foreign, unsafe or
older-format file) is a one-line :class:`~rag_kernels.cotrain.errors.UserError` naming the
file.

Models sharded by FSDP2 (``--fsdp``) write the same file: :func:`full_trainable_state` and
:func:`full_optimizer_state` gather the full tensors to rank 0 (collectives: every rank
calls them), :func:`load_full_state` and :func:`shard_optimizer_state` cut every rank's
shard out of the full tensors it read. So a checkpoint resumes with or without ``--fsdp``
and ``rag-kernels eval`` reads it in one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import random
import struct
import types

import numpy as np
import torch

from ..errors import UserError, one_line
from .files import atomic_write, read_bytes

FORMAT = "rag-kernels.cotrain.checkpoint"
VERSION = 2
STATE_KEYS = (
    "step",
    "cursor",
    "config",
    "data",
    "generator",
    "retriever",
    "optimizer",
    "scheduler",
    "combine",
    "index",
    "rng",
)

__all__ = [
    "FORMAT",
    "VERSION",
    "data_fingerprints",
    "full_optimizer_state",
    "full_trainable_state",
    "get_rng_state",
    "load_full_state",
    "read_checkpoint",
    "set_rng_state",
    "shard_optimizer_state",
    "write_checkpoint",
]


# ------------------------------------------------------------------------- RNG as plain data
def get_rng_state() -> dict:
    """Python, numpy, torch CPU and CUDA generator states as tensors and plain numbers."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss is None else float(gauss),
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(st: dict) -> None:
    py = st["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    n = st["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].cpu().numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(st["torch"].cpu())
    if st["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]])


def rng_state_problem(st) -> str | None:
    """Why :func:`set_rng_state` would fail on ``st`` (None if it takes it): the real setters
    are tried, then this process's states put back, so whatever a crafted checkpoint holds is
    refused before anything is loaded."""
    saved = get_rng_state()
    try:
        set_rng_state(st)
    except Exception as e:  # any content: KeyError, TypeError, RuntimeError (size), ...
        return f"{type(e).__name__}: {one_line(e)}"
    finally:
        set_rng_state(saved)
    return None


# ------------------------------------------------------------------------- data fingerprints
def _digest(records) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps(dataclasses.asdict(r), sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def data_fingerprints(dataset, world_size: int = 1) -> dict:
    """SHA-256 of the corpus, the training, the dev and the evaluation (test) questions as
    loaded (so the embedded set's seed, a file's content and a dataset passed in code are
    covered)."""
    return {
        "corpus": _digest(dataset.corpus),
        "train": _digest(dataset.train),
        "dev": _digest(dataset.dev),
        "eval": _digest(dataset.test),
        "world_size": int(world_size),
    }


# ------------------------------------------------------------------------- file format
_MAGIC = b"rag-kernels.cotrain.checkpoint v2 sha256 "
_TRAILER = len(_MAGIC) + 64
_EOCD = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes + the comment


def _with_trailer(raw: bytes) -> bytes:
    if len(raw) < 22 or raw[-22:-18] != _EOCD or raw[-2:] != b"\0\0":
        raise RuntimeError("torch.save did not end with a comment-less zip directory record")
    head = raw[:-2] + struct.pack("<H", _TRAILER) + _MAGIC
    return head + hashlib.sha256(head).hexdigest().encode("ascii")


def write_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` (tensors and plain data only) to ``path`` atomically, checksummed."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    data = _with_trailer(buf.getvalue())
    atomic_write(path, lambda fh: fh.write(data))


def read_checkpoint(path: str, map_location="cpu") -> dict:
    """The verified training state of the checkpoint at ``path`` (see the module docstring)."""
    raw = read_bytes(path)
    if not raw:
        raise UserError(f"{path}: empty file (0 bytes), not a checkpoint")
    if len(raw) < _TRAILER + 22 or raw[-_TRAILER:-64] != _MAGIC:
        kind = "a zip/torch file" if raw[:4] == b"PK\x03\x04" else "not a zip file"
        raise UserError(
            f"{path}: not a rag-kernels checkpoint, or a truncated or corrupt one ({kind} "
            "without the checksum trailer: another program's file, one written by an older "
            "rag-kernels, or a damaged one); not loaded"
        )
    recorded = raw[-64:]
    actual = hashlib.sha256(raw[:-64]).hexdigest().encode("ascii")
    if actual != recorded:
        raise UserError(
            f"{path}: corrupt checkpoint: checksum mismatch (sha256 of the content "
            f"{actual[:16].decode()}…, recorded "
            f"{recorded[:16].decode('ascii', 'replace')}…); not loaded"
        )
    try:
        state = torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        first = next((ln.strip() for ln in text.splitlines() if "global" in ln.lower()), "")
        detail = f" ({first[:160]})" if first else ""
        raise UserError(
            f"{path}: refused to load: it holds Python objects other than tensors "
            f"and plain data{detail}; nothing in it was run"
        ) from None
    except Exception as e:  # damaged content behind a forged digest: many exception types
        raise UserError(f"{path}: not a valid checkpoint ({one_line(e)[:160]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not a rag-kernels checkpoint (no {FORMAT!r} marker)")
    if state.get("version") != VERSION:
        raise UserError(
            f"{path}: checkpoint format version {state.get('version')!r} is not "
            f"supported (this rag-kernels reads version {VERSION})"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UserError(f"{path}: corrupt checkpoint (missing {', '.join(missing)})")
    if not all(
        isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0
        for k in ("step", "cursor")
    ):
        raise UserError(f"{path}: corrupt checkpoint (step/cursor are not non-negative ints)")
    problem = rng_state_problem(state["rng"])
    if problem:
        raise UserError(f"{path}: corrupt checkpoint (rng: {problem[:160]})")
    return state


# ------------------------------------------------------------------------- FSDP2 (--fsdp)
def _is_dtensor(x) -> bool:
    from rag_kernels.ops.validation import is_dtensor

    return is_dtensor(x)


def full_trainable_state(module: torch.nn.Module) -> dict:
    """The trainable parameters of an FSDP2-sharded ``module`` as full CPU tensors, keyed as
    ``named_parameters`` (the replicated run's checkpoint keys): on rank 0; ``{}`` on the
    other ranks. Collective (``get_model_state_dict(full_state_dict=True,
    cpu_offload=True)``: one all-gather per parameter, frozen ones skipped)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    names = [k for k, p in module.named_parameters() if p.requires_grad]
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    full = get_model_state_dict(module, options=opts)
    return {k: full[k] for k in names if k in full}


def load_full_state(module: torch.nn.Module, state: dict) -> types.SimpleNamespace:
    """Load full tensors ``state`` (a subset of the parameters, as :func:`full_trainable_state`
    or a replicated run writes them) into an FSDP2-sharded ``module``: every rank holds the
    whole ``state`` and keeps its own shard (``set_model_state_dict(full_state_dict=True)``;
    collective). Returns ``missing_keys`` (parameters not in ``state``) and
    ``unexpected_keys`` (keys of ``state`` that are no parameter or buffer), as
    ``load_state_dict(strict=False)``; nothing is loaded when some key is unexpected."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    known = {k for k, _ in module.named_parameters(remove_duplicate=False)}
    known |= {k for k, _ in module.named_buffers(remove_duplicate=False)}
    unexpected = sorted(set(state) - known)
    if not unexpected:
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, dict(state), options=opts)  # the copy: it is consumed
    missing = sorted({k for k, _ in module.named_parameters()} - set(state))
    return types.SimpleNamespace(missing_keys=missing, unexpected_keys=unexpected)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with every DTensor state (AdamW's moments of a sharded
    parameter) gathered to a full CPU tensor: the layout torch writes for replicated
    parameters, keyed by parameter position. Collective (``full_tensor``: one all-gather per
    sharded state tensor, on every rank)."""
    sd = optimizer.state_dict()
    state = {
        i: {k: v.full_tensor().cpu() if _is_dtensor(v) else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    return {**sd, "state": state}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """The inverse of :func:`full_optimizer_state` for ``optimizer.load_state_dict``: each
    full state tensor of a sharded (DTensor) parameter becomes that parameter's DTensor,
    this rank's shard cut from the full tensor every rank read (no communication). Raises
    ValueError for a state tensor whose shape is not its parameter's."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[i] if isinstance(i, int) and 0 <= i < len(params) else None
        if p is None or not _is_dtensor(p):
            state[i] = s
            continue
        out = {}
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                if tuple(v.shape) != tuple(p.shape):
                    raise ValueError(
                        f"optimizer state {k!r} of parameter {i} has shape {tuple(v.shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
                v = distribute_tensor(
                    v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None
                )
            out[k] = v
        state[i] = out
    return {**sd, "state": state}
