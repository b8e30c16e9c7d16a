"""An exported ONNX decoder run with IO binding, its KV cache kept in place between steps.

:func:`fxopt.runtime.ort_step` hands every input to ``InferenceSession.run`` as numpy and gets every
output back as new numpy arrays, so the whole cache travels out of ONNX Runtime and back in on every
token. :class:`OrtDecoder` is a ``step`` for the same loop (:func:`fxopt.runtime.generate`) that binds
inputs and outputs instead (``session.io_binding()``); the ``present_*`` it returns are
:class:`CacheHandle` objects that the loop passes back as the next ``past_*`` untouched. Two modes:

* ``"shared-buffer"`` — for a file whose cache inputs feed only ``GroupQueryAttention``
  (:mod:`fxopt.lowering.decoder_ops`, metadata ``fxopt.kv_cache = shared-buffer``): one buffer per cache
  tensor, ``[B, H_kv, C, d]``, bound as both ``past_*`` and ``present_*``; the kernel writes this step's
  keys/values at slots ``[P, P + T)`` and reads ``[0, P + T)``, so nothing is copied per token. The
  capacity ``C`` starts at ``capacity`` (default: the first step's length + 1 rounded up to 256) and
  doubles, copying the cache once, when a step would not fit.
* ``"bound"`` — any other decoder file (the exporter's generic form, ``decoder_kernels=False``): outputs
  are bound to ORT-allocated values and the next step binds those values as its ``past_*``; the graph
  still concatenates past and new, but the cache never becomes numpy.

A step whose ``past_*`` are tensors (the loop's first step, with fxopt's dummy slots) starts a new
sequence. A handle stays valid for its length: re-running a step from an earlier handle of the same
sequence is correct (slots past its length are rewritten); handles of an earlier sequence are refused.
``logits`` come back as a torch tensor; :meth:`CacheHandle.tensor` reads a cache tensor (a view in the
shared-buffer mode).

    from fxopt.runtime import OrtDecoder, generate
    ids = generate(OrtDecoder("decoder.onnx", threads=2), res.decoder, input_ids, max_new_tokens=128)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..ir.decoder import DecoderError

SHARED = "shared-buffer"
BOUND = "bound"
_ROUND = 256


@dataclass(frozen=True)
class CacheHandle:
    """One cache tensor after a step: ``length`` valid slots of ``value`` (an ``OrtValue``), from sequence ``epoch``
    of the :class:`OrtDecoder` ``owner``."""

    owner: int
    epoch: int
    name: str
    value: object
    length: int

    def tensor(self) -> torch.Tensor:
        """The valid slots ``[B, H_kv, length, ...]`` (a view of the buffer in the shared-buffer mode)."""
        arr = self.value.numpy()
        return torch.from_numpy(arr[:, :, : self.length])


class OrtDecoder:
    """A ``step`` over an ONNX decoder file with IO binding (see the module docstring).

    Args:
        model: the ``.onnx`` file, or an :class:`fxopt.backends.OrtBackend` over it.
        threads: ORT intra-op threads (ignored when ``model`` is a backend).
        share_buffer: ``None`` — shared buffers when the file allows them; ``False`` — always ``"bound"``;
            ``True`` — shared buffers or :class:`~fxopt.ir.decoder.DecoderError` naming why not.
        capacity: initial cache slots per sequence in the shared-buffer mode.
        spin: ORT's spinning intra-op threads (``False`` when other work shares the cores).
    """

    def __init__(self, model, *, threads: int | None = None, share_buffer: bool | None = None,
                 capacity: int | None = None, spin: bool = True):
        from ..backends.ort import OrtBackend
        from ..lowering.decoder_ops import KV_CACHE_KEY, SHARED_BUFFER

        self.backend = model if isinstance(model, OrtBackend) else OrtBackend(model, threads=threads, spin=spin)
        sess = self.backend.session
        self.session = sess
        self.input_names = list(self.backend.input_names)
        self.output_names = list(self.backend.output_names)
        self.past_names = [n for n in self.input_names if n.startswith("past_")]
        self.present_names = ["present_" + n[len("past_"):] for n in self.past_names]
        missing = [n for n in ["input_ids", "attention_mask", "logits", *self.present_names]
                   if n not in self.input_names + self.output_names]
        if missing or not self.past_names:
            raise DecoderError(f"{self.backend.path} is not an fxopt decoder step (missing {missing or 'past_* inputs'}): "
                               "export it from a task='text-generation' result")
        shareable = self.backend.metadata.get(KV_CACHE_KEY) == SHARED_BUFFER
        if share_buffer and not shareable:
            raise DecoderError(f"{self.backend.path.name} cannot share past/present buffers: its cache inputs are read "
                               "by more than GroupQueryAttention (export with decoder_kernels=True, the default; the "
                               "export report's notes say which rule did not apply)")
        self.mode = SHARED if (shareable and share_buffer is not False) else BOUND
        types = {i.name: i.type for i in sess.get_inputs()}
        self._dtypes = {n: _NP[types[n]] for n in self.past_names}
        self._capacity0 = capacity
        self._buffers: dict[str, np.ndarray] = {}
        self._values: dict[str, object] = {}
        self._epoch = 0
        self._io = sess.io_binding()
        #: cache bytes copied by this object since creation (growing a shared buffer; a new sequence's first past)
        self.bytes_copied = 0

    # ------------------------------------------------------------------ the step

    def __call__(self, feed: dict) -> dict:
        io = self._io
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        ids = _np(feed["input_ids"])
        mask = _np(feed["attention_mask"])
        total, new = mask.shape[1], ids.shape[1]
        for name in self.input_names:
            if name in self.past_names:
                continue
            if name not in feed:
                raise DecoderError(f"step input {name!r} missing (got {sorted(feed)})")
            io.bind_cpu_input(name, np.ascontiguousarray(_np(feed[name])))
        io.bind_output("logits", "cpu")                 # outputs come back in binding order: logits, present_*, others
        pasts = [feed[n] for n in self.past_names]
        fresh = not all(isinstance(p, CacheHandle) for p in pasts)
        if not fresh:
            for p in pasts:
                if p.owner != id(self) or p.epoch != self._epoch:
                    raise DecoderError(f"{p.name}: a cache handle from another sequence or decoder; start a new "
                                       "sequence with tensors as past_*")
        if self.mode == SHARED:
            self._bind_shared(feed, pasts, fresh, total, new)
        else:
            self._bind_bound(pasts, fresh)
        others = [n for n in self.output_names if n != "logits" and n not in self.present_names]
        for name in others:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        outs = dict(zip(["logits", *self.present_names, *others], io.get_outputs()))
        result = {"logits": torch.from_numpy(outs["logits"].numpy())}
        for past, present in zip(self.past_names, self.present_names):
            value = self._values[past] if self.mode == SHARED else outs[present]
            result[present] = CacheHandle(id(self), self._epoch, present, value, total)
        for name in others:
            result[name] = torch.from_numpy(outs[name].numpy())
        return result

    def _bind_bound(self, pasts, fresh: bool) -> None:
        import onnxruntime as ort

        if fresh:
            self._epoch += 1
        for name, p in zip(self.past_names, pasts):
            if isinstance(p, CacheHandle):
                self._io.bind_ortvalue_input(name, p.value)
            else:
                self._io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(_np(p))))
        for name in self.present_names:
            self._io.bind_output(name, "cpu")

    def _bind_shared(self, feed, pasts, fresh: bool, total: int, new: int) -> None:
        import onnxruntime as ort

        past_len = total - new
        if fresh:
            self._epoch += 1
            first = _np(pasts[0])
            batch = first.shape[0]
            cap = self._capacity0 or _round_up(total + 1)
            self._buffers = {}
            for name, p in zip(self.past_names, pasts):
                arr = _np(p)
                if arr.shape[2] != past_len:
                    raise DecoderError(f"{name} has {arr.shape[2]} slots but attention_mask says {past_len} cached tokens")
                buf = np.zeros((batch, arr.shape[1], max(cap, total), *arr.shape[3:]), dtype=self._dtypes[name])
                buf[:, :, :past_len] = arr
                self.bytes_copied += arr.nbytes
                self._buffers[name] = buf
            self._values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in self._buffers.items()}
        else:
            lengths = {p.length for p in pasts}
            if lengths != {past_len}:
                raise DecoderError(f"cache handles hold {sorted(lengths)} slots but attention_mask says {past_len} "
                                   "cached tokens")
            cap = next(iter(self._buffers.values())).shape[2]
            if total > cap:
                self._grow(_round_up(max(2 * cap, total + 1)), past_len)
        for past, present in zip(self.past_names, self.present_names):
            self._io.bind_ortvalue_input(past, self._values[past])
            self._io.bind_ortvalue_output(present, self._values[past])

    def _grow(self, cap: int, valid: int) -> None:
        import onnxruntime as ort

        for name, buf in list(self._buffers.items()):
            bigger = np.zeros((buf.shape[0], buf.shape[1], cap, *buf.shape[3:]), dtype=buf.dtype)
            bigger[:, :, :valid] = buf[:, :, :valid]
            self.bytes_copied += buf[:, :, :valid].nbytes
            self._buffers[name] = bigger
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(b) for n, b in self._buffers.items()}

    @property
    def capacity(self) -> int:
        """Cache slots of the current shared buffers (0 before the first step or in the bound mode)."""
        return next(iter(self._buffers.values())).shape[2] if self._buffers else 0

    def __repr__(self) -> str:
        return f"OrtDecoder({os.fspath(self.backend.path)!r}, mode={self.mode!r})"


_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
       "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(int32)": np.int32, "tensor(int64)": np.int64}


def _np(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().numpy()
    return np.asarray(v)


def _round_up(n: int) -> int:
    return -(-int(n) // _ROUND) * _ROUND
