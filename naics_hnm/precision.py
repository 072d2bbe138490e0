"""bfloat16 autocast for embedding (inference) passes on CPUs with AVX-512 BF16 or AMX; elsewhere fp32 as ever.

Opt out with ``NAICS_HNM_BF16=0`` (also ``off``/``false``/``no``) or ``bf16=False`` on :func:`embed_codes`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path
from typing import Iterator

import torch

log = logging.getLogger(__name__)

ENV_VAR = "NAICS_HNM_BF16"
_OFF = ("0", "off", "false", "no")
_ON = ("1", "on", "true", "yes", "")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 instruction flags this CPU reports (Linux ``/proc/cpuinfo``; none elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return tuple(f for f in BF16_CPU_FLAGS if f in flags)
    return ()


def cpu_supports_bf16() -> bool:
    """True where the CPU has native bf16 arithmetic and torch dispatches AVX-512 kernels."""
    return bool(cpu_bf16_flags()) and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")


def env_setting() -> bool | None:
    """``NAICS_HNM_BF16``: False (opted out), True (asked for) or None (unset: automatic)."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    value = value.strip().lower()
    if value in _OFF:
        return False
    if value in _ON:
        return True
    raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {_OFF + _ON[:-1]} (or unset)")


_logged: set[tuple[bool, str]] = set()


def use_bf16(device: torch.device | str = "cpu", bf16: bool | None = None) -> bool:
    """Whether a pass on ``device`` runs under bf16 autocast: only on a CPU with bf16, unless opted out; logged once."""
    if bf16 not in (None, True, False):
        raise ValueError(f"bf16={bf16!r}: expected None (automatic), True or False")
    device_type = torch.device(device).type
    wanted = env_setting() if bf16 is None else bf16
    if wanted is False:
        decision, why = False, f"opted out ({ENV_VAR}=0 or bf16=False)"
    elif device_type != "cpu":
        decision, why = False, f"device {device_type}: fp32 as before"
    elif not cpu_supports_bf16():
        decision, why = False, "this CPU has no native bf16 (avx512_bf16/amx_bf16)"
    else:
        decision, why = True, f"CPU flags {', '.join(cpu_bf16_flags())}"
    if (decision, why) not in _logged:
        _logged.add((decision, why))
        log.info("embedding passes in %s: %s", "bf16 autocast" if decision else "fp32", why)
    return decision


@contextlib.contextmanager
def embedding_autocast(device: torch.device | str = "cpu", bf16: bool | None = None) -> Iterator[bool]:
    """Run the block under CPU bf16 autocast where :func:`use_bf16` says so; yields the decision."""
    if use_bf16(device, bf16):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield True
    else:
        yield False
