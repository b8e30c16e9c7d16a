"""Which integer-GEMM instructions the CPU has, and what that means for int8 weights.

ONNX Runtime's MLAS and oneDNN both compute ``u8 activations × s8 weights`` with the instruction
the CPU offers, and the instruction decides whether full-range int8 weights are exact:

================  ======================================  ==========================================
ISA               u8×s8 inner product                      full s8 weights ``[−127, 127]``
================  ======================================  ==========================================
``avx2``          ``VPMADDUBSW``: pairs of products        can saturate: ``|a₀w₀ + a₁w₁|`` reaches
                  summed into **int16, saturating**        ``2·255·127 = 64770 > 32767``
``avx512``        the same instruction, 512 bits wide      can saturate, as ``avx2``
``avx-vnni``      ``VPDPBUSD``: four products into int32   exact
``avx512-vnni``   ``VPDPBUSD`` (512 bits)                  exact
``amx``           ``TDPBUSD`` tiles, int32                 exact
``arm-dotprod``   ``SDOT``/``UDOT`` (s8·s8 / u8·u8) int32  exact
``arm-i8mm``      ``USMMLA``/``SMMLA``, int32              exact
``portable``      unknown CPU: assume the worst (avx2)     can saturate
================  ======================================  ==========================================

With weights on ``[−64, 64]`` (7-bit magnitudes, ONNX Runtime's ``reduce_range``, PyTorch's x86
default) a pair stays within ``2·255·64 = 32640 ≤ 32767`` and ``VPMADDUBSW`` is exact: that is the
form :func:`weight_qmax` gives for the targets that need it. :func:`detect` reads the running
CPU; ``FXOPT_ISA`` overrides it (to test on one machine what fxopt does for another).
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import lru_cache

#: targets fxopt lowers for, in the order a user would name them
TARGETS = ("avx2", "avx512", "avx-vnni", "avx512-vnni", "amx", "arm-dotprod", "arm-i8mm", "arm", "portable")
#: targets whose u8×s8 kernel accumulates pairs in saturating int16
SATURATING = frozenset({"avx2", "avx512", "portable", "arm"})
#: the magnitude bound that keeps a VPMADDUBSW pair in int16: 2·255·qmax ≤ 32767
REDUCED_QMAX = 64
FULL_QMAX = 127
#: target names a user may also write
ALIASES = {"vnni": "avx512-vnni", "avx512vnni": "avx512-vnni", "avxvnni": "avx-vnni", "x86": "portable",
           "avx512bw": "avx512", "neon": "arm", "dotprod": "arm-dotprod", "i8mm": "arm-i8mm"}


@dataclass(frozen=True)
class CpuInfo:
    """What :func:`detect` found: the int8 target, the CPU's name and the flags that decided it."""

    target: str
    model: str
    flags: tuple[str, ...]
    overridden: bool = False

    @property
    def exact_s8(self) -> bool:
        """Full-range s8 weights run exactly on this CPU's u8×s8 kernels."""
        return self.target not in SATURATING

    def line(self) -> str:
        """One line for tables and ``fxopt env``: ``Intel Xeon … · int8 ISA avx512-vnni (amx, …)``."""
        src = " (FXOPT_ISA)" if self.overridden else ""
        flags = ", ".join(self.flags) if self.flags else "no int8 dot-product extension"
        return f"{self.model} · int8 ISA {self.target}{src} [{flags}] · {os.cpu_count()} cores"


def normalize(target: str) -> str:
    """A target name, canonical; ``ValueError`` naming the choices for anything else."""
    t = str(target).strip().lower().replace("_", "-")
    t = ALIASES.get(t.replace("-", ""), ALIASES.get(t, t))
    if t not in TARGETS:
        raise ValueError(f"unknown int8 target {target!r}: use 'auto' (this CPU), 'portable' (any CPU), or one of "
                         f"{', '.join(TARGETS)}")
    return t


def resolve(target: str | None) -> str:
    """``auto``/None → the running CPU's target; anything else normalized."""
    if target is None or str(target).lower() == "auto":
        return detect().target
    return normalize(target)


def weight_qmax(target: str | None) -> int:
    """The largest int8 weight magnitude that is exact on ``target``: 64 where pairs saturate, else 127."""
    return REDUCED_QMAX if resolve(target) in SATURATING else FULL_QMAX


def _cpu_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "cpu model", "hardware") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "features"):
                    flags |= set(value.split())
                    if key == "flags" and model != platform.machine():
                        break
    except OSError:
        pass
    if not flags and platform.system() == "Darwin":          # Apple silicon: dotprod and i8mm from sysctl
        import subprocess
        for name, flag in (("hw.optional.arm.FEAT_DotProd", "asimddp"), ("hw.optional.arm.FEAT_I8MM", "i8mm")):
            try:
                out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2).stdout
                if out.strip() == "1":
                    flags.add(flag)
            except (OSError, subprocess.SubprocessError):
                pass
    return model or "unknown CPU", flags


def _from_flags(machine: str, flags: set[str]) -> tuple[str, tuple[str, ...]]:
    machine = machine.lower()
    if machine in ("aarch64", "arm64") or "asimd" in flags:
        seen = tuple(f for f in ("asimddp", "i8mm") if f in flags)
        return ("arm-i8mm" if "i8mm" in flags else "arm-dotprod" if "asimddp" in flags else "arm"), seen
    names = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    seen = tuple(f for f in names if f in flags)
    if "amx_int8" in flags:
        return "amx", seen
    if "avx512_vnni" in flags:
        return "avx512-vnni", seen
    if "avx_vnni" in flags:
        return "avx-vnni", seen
    if "avx512bw" in flags:
        return "avx512", seen
    return ("avx2" if "avx2" in flags else "portable"), seen


@lru_cache(maxsize=None)
def _detect(override: str | None) -> CpuInfo:
    model, flags = _cpu_flags()
    target, seen = _from_flags(platform.machine(), flags)
    if override:
        return CpuInfo(normalize(override), model, seen, overridden=True)
    return CpuInfo(target, model, seen)


def detect() -> CpuInfo:
    """The running CPU's int8 target (``FXOPT_ISA=avx2`` etc. overrides it)."""
    return _detect(os.environ.get("FXOPT_ISA") or None)


def onednn_target() -> str:
    """The target oneDNN computes for: this CPU's, capped by ``ONEDNN_MAX_CPU_ISA`` (``AVX2`` makes a
    VNNI machine run oneDNN's saturating AVX2 kernels)."""
    here = detect().target
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if not cap or cap in ("ALL", "DEFAULT") or here in SATURATING:
        return here
    if "AMX" in cap:
        return here
    if "VNNI" in cap:
        return here if here in ("avx-vnni", "avx512-vnni") else ("avx512-vnni" if "AVX512" in cap else "avx-vnni")
    return "avx512" if cap.startswith("AVX512") else "avx2"
