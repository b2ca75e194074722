"""The compute precision of the trainer-based stages (train, rl): what ``precision: auto|bf16|fp16|fp32``
becomes on this machine, and whether its CPU has bf16 instructions."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

from .errors import SynthpertError

log = logging.getLogger("synthpert.precision")

# /proc/cpuinfo flags of native bf16 arithmetic (x86: AVX512-BF16, AMX-BF16; Arm: BF16 in SVE/NEON)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16(cpuinfo: str | None = None) -> bool | None:
    """True/False from the CPU's flags (Linux /proc/cpuinfo); None where they cannot be read (macOS, Windows).
    ``cpuinfo``: the file's text (tests)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if platform.system() != "Linux" or not path.is_file():
            return None
        try:
            cpuinfo = path.read_text()
        except OSError:
            return None
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            flags |= set(value.split())
    return bool(flags & set(BF16_CPU_FLAGS)) if flags else None


def resolve_precision(precision: str, quantization: str = "none", stage: str = "training",
                      device: str | None = None, cpuinfo: str | None = None) -> tuple[str, str | None]:
    """(precision to train in, warning or None). On CPU: auto is fp32; bf16 runs (torch autocast and bf16
    kernels: faster where the CPU has bf16 instructions, so only a warning where it lacks them or cannot tell);
    fp16 and QLoRA need a GPU. On a GPU: auto is bf16 where supported, else fp16."""
    device = device or device_kind()
    if device == "cpu":
        if quantization == "4bit":
            raise SynthpertError("QLoRA (quantization=4bit) needs a CUDA GPU (bitsandbytes 4-bit kernels); on CPU "
                                 "set quantization=none")
        if precision == "fp16":
            raise SynthpertError(f"precision=fp16 needs a GPU; on CPU {stage} runs in fp32 (precision=auto or "
                                 "fp32) or bf16")
        if precision != "bf16":
            return "fp32", None
        has = cpu_has_bf16(cpuinfo)
        warning = None
        if has is False:
            warning = ("precision=bf16 on a CPU without bf16 instructions (no avx512_bf16 / amx_bf16 flag): torch "
                       "emulates them, which is usually slower than fp32")
        elif has is None:
            warning = "precision=bf16 on CPU: cannot tell whether this CPU has bf16 instructions (slow without)"
        if warning:
            log.warning(warning)
        return "bf16", warning
    if precision == "auto":
        import torch

        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16"), None
    return precision, None
