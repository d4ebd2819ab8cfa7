"""One rank reads a DeepSpeed `pretrained=` checkpoint for all ranks of a fine-tune.

Reading a DeepSpeed checkpoint unpickles it and consolidates every ZeRO partition in memory; N ranks of a
node doing that at once need N times the checkpoint's memory and time. Here the main rank reads it once and
writes the fp32 weights, with what `load_weights` knows about them, as one safetensors file (`cache`); after
a barrier the other ranks read that file (no pickle, no DeepSpeed). Exports are safetensors already: every
rank reads them directly. The cache is removed once every rank has read it.

A rank that, after the barrier, finds no cache for this source (the main rank failed, or `cache` is on a
disk it does not share) reads the source itself, so every rank ends with the same weights or the same error.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Callable, Optional

from core.files import atomic_path
from pipeline.weights.pretrained import load_weights, resolve
from pipeline.weights.files import load_safetensors_file

log = logging.getLogger("pipeline.weights.pretrained")

_META_KEY = "coatnet.pretrained.meta"
_REQUEST_KEY = "coatnet.pretrained.request"


def _request(source, ema: bool) -> str:
    return json.dumps({"source": str(source), "ema": bool(ema)})


def _write_cache(cache: str, state: dict, meta: dict, request: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
    with atomic_path(cache, durable=False) as tmp:  # read right away, deleted after: no fsync needed
        save_file(state, str(tmp), metadata={_META_KEY: json.dumps(meta), _REQUEST_KEY: request})


def _read_cache(cache: str, source, request: str) -> Optional[tuple[dict, dict]]:
    """The cached (state, meta) when it was written for this request and this source's newest checkpoint."""
    if not os.path.isfile(cache):
        return None
    state, extra = load_safetensors_file(cache)
    meta = json.loads(extra.get(_META_KEY) or "{}")
    if extra.get(_REQUEST_KEY) != request or meta.get("checkpoint") != resolve(source)[1]:
        return None  # a leftover of another launch on a disk the main rank does not share
    return state, meta


def _remove(cache: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(cache)


def load_weights_once(source, is_main: bool, barrier: Optional[Callable[[], None]], cache: str,
                      ema: bool = True, trust_pickle: bool = False) -> tuple[dict, dict]:
    """`load_weights(source, ema, trust_pickle)` on every rank, reading a DeepSpeed checkpoint on one rank only.

    Every rank calls it with the same arguments; `barrier` (e.g. torch.distributed.barrier) is called twice
    on every rank, errors included; `barrier=None` (one rank) is a plain `load_weights`. `cache` is a
    safetensors path every rank can read, e.g. RUN_DIR/pretrained.fp32.safetensors of the fine-tune.
    The result goes to `init_from_pretrained(model, result, classes)`.
    """
    if barrier is None:
        return load_weights(source, ema=ema, trust_pickle=trust_pickle)
    request = _request(source, ema)
    if is_main:
        loaded, error = None, None
        try:
            _remove(cache)
            loaded = load_weights(source, ema=ema, trust_pickle=trust_pickle)
        except Exception as e:  # noqa: BLE001 - raised after both barriers, so no rank waits forever
            error = e
        if loaded is not None and loaded[1].get("format") != "safetensors":
            try:
                _write_cache(cache, *loaded, request)
            except OSError as e:  # the others then read the source themselves, as before
                log.warning("cannot write %s (%s); every rank reads %s itself", cache, e, source)
        barrier()  # 1: the cache is written (or known absent)
        barrier()  # 2: every rank has read it
        _remove(cache)
        if error is not None:
            raise error
        return loaded
    barrier()
    try:
        return _read_cache(cache, source, request) or load_weights(source, ema=ema, trust_pickle=trust_pickle)
    finally:
        barrier()
