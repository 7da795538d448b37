"""What the machine's CPU does fast: one answer for training and embedding.

bf16 is a large win only where the CPU has bf16 instructions: on an Intel Xeon with AVX-512 BF16
and AMX, a 1024 x 1024 matrix product measured 464 GFLOP/s in bf16 against 64 in fp32 (2 cores,
torch 2.13); on an AMD EPYC with AVX2 only, an earlier session measured bf16 80x *slower* than
fp32 (emulated). So "auto" means bf16 exactly when the CPU reports those instructions.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """The CPU executes bf16 natively (AVX-512 BF16 or AMX), read from /proc/cpuinfo (Linux);
    anywhere it cannot be read, False: fp32 is never slow, emulated bf16 is."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return bool(_BF16_FLAGS & set(line.split(":", 1)[-1].split()))
    return False


def use_bf16(precision: str, on_gpu: bool = False) -> bool:
    """``precision`` as configured ("auto", "fp32", "bf16") resolved for this machine."""
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if on_gpu:
        import torch

        return bool(torch.cuda.is_bf16_supported())
    return cpu_has_bf16()
