"""Which XLA flags and int8 formulation suit this CPU, read from its feature flags.

    choice = choose(cpu_flags())     # /proc/cpuinfo's flags (or a string of them)
    choice.xla_flags                 # e.g. ('--xla_cpu_use_onednn=true',) on AMX CPUs
    choice.int8_formulation          # 'int8', 'float32' or 'kernel' (seg.inference.quantize)
    choice.bf16_formulation          # 'kernel' (seg.inference.float_kernel) or 'xla'
    choice.f32_formulation           # the same for float32
    choice.reason                    # one line: why

Imports nothing heavy: the CLI calls it before JAX starts (`seg.cli.process`), since XLA
reads its flags once.

The rules, and what they rest on (docs/performance.md, "int8"):
- AMX (`amx_int8`, `amx_bf16`): oneDNN (`--xla_cpu_use_onednn=true`) has the AMX kernels; on a
  2-core Xeon it doubled XLA's int8 and bfloat16 product rates (1,257 vs 616 GMAdd/s int8,
  531 vs 245 bfloat16; issue 17's measurement, 2026-11-29). With jaxlib 0.10.2 on the same
  kind of Xeon (2026-12-02, `benchmarks/int8_fusion_probe.py`) XLA's own products ran as
  fast without it (int8 1,899 vs 1,812, bfloat16 516 vs 502 GMAdd/s); the flag is kept
  until an engine A/B says otherwise. The int8 formulation there is 'kernel': the project's
  kernel multiplies in AMX tiles with the requantisation in its output loop, faster than
  XLA's int8 in the engine (2-core Xeon with AMX, 2026-12-02: docs/performance.md, "The int8
  kernel with AMX tiles"); 'int8' where it cannot be built.
- AVX-512 VNNI without AMX: the kernel's VNNI loop (`vpdpbusd`, 64 multiply-adds per
  instruction) -> 'kernel'. On a 2-core AMD EPYC Zen 4 (2026-12-05,
  `benchmarks/int8_kernel_layers.py`) the network's products took 9.6 ms in it against 38.3
  in XLA's int8 (with its quantise / dequantise) and 33.9 in XLA's float32; on an Intel Xeon
  with VNNI but no AMX (2026-12-02) XLA's int8 ran at float32's rate (100 vs 116 GMAdd/s).
- AVX2 and FMA on x86-64 (with AVX-VNNI or without VNNI): XLA's int8 products run at
  float32's rate (AVX2-only AMD EPYC, 2026-12-01: 65-82 vs 54-80 GMAdd/s at the network's
  shapes; oneDNN no faster), and the kernel's AVX2 loop is faster (docs/performance.md, "The
  fused int8 kernel"; on the Zen 4 above 18.6 ms against XLA int8's 38.3) -> 'kernel', in
  its AVX-VNNI loop where the CPU has `avx_vnni` (Intel's client cores since Alder Lake, its
  E-core Xeons: the VNNI instruction in 256 bits; 1.8x the AVX2 loop's rate on the products
  with the same instruction in its AVX-512 VL encoding on the Zen 4, 2026-12-06).
  AVX2 without FMA -> 'int8'.
- Neither (no AVX2 on x86, or an ARM core without `asimddp`): the 'float32' formulation, the
  same integers multiplied exactly in float32 (what such CPUs do fastest).
Where 'kernel' is chosen and cannot be built, the engine falls back to 'int8'.
SEG_INT8_FORMULATION (`formulation_override`) overrides the choice, e.g. for A/B timings.

bfloat16 ("bfloat16" in docs/performance.md): 'kernel' on x86-64 CPUs with AVX2, FMA and
AVX-512 BF16 or AMX-BF16 (the project's kernel rounds float32 activations to bfloat16 as it
reads them: the network's products in 8.2 ms against XLA's 12.4 in bfloat16 and 18.9 in
float32, `benchmarks/float_kernel_layers.py`, and the engine at 11.7 against 17.0 ms per
image with XLA's bfloat16, on a 2-core AMD EPYC Zen 5, 2026-12-06), else 'xla' (XLA's
bfloat16 products). SEG_BF16_FORMULATION overrides it.

float32 ("float32 in the kernel" in docs/performance.md): 'kernel' on x86-64 CPUs with AVX2,
FMA and AVX-512 F, BW, VL and DQ (the same kernel's float32 products, depthwise layers and
stem pass: the network's products in 13.7 ms against XLA's 22.3, and the engine at 0.72-0.73x
XLA's float32 time per image, call by call in one process, on a 2-core AMD EPYC Zen 5,
2026-12-06), else 'xla'. The kernel's AVX2 loops run on CPUs with AVX2 and FMA alone but
are not chosen there: not measured on such a CPU (on the Zen 5, forced, 1.32x XLA's time,
XLA using AVX-512). SEG_F32_FORMULATION overrides it (kernel: the AVX2 loops where AVX-512
is missing).
"""

import dataclasses
import os
import platform
from typing import FrozenSet, Iterable, Optional, Tuple, Union

CPUINFO = '/proc/cpuinfo'
# What the float kernel's float32 loops need (int8_kernel.AVX512_FLAGS; no JAX here).
AVX512_FLAGS = frozenset({'avx512f', 'avx512bw', 'avx512vl', 'avx512dq'})
# The int8 formulations of seg.inference.quantize (defined here: this module imports no JAX).
FORMULATIONS = ('int8', 'float32', 'kernel')
# The float32 and bfloat16 formulations: XLA's products, or the project's kernel
# (seg.inference.float_kernel).
FLOAT_FORMULATIONS = ('xla', 'kernel')


@dataclasses.dataclass(frozen=True)
class Choice:
  xla_flags: Tuple[str, ...]
  int8_formulation: str
  reason: str
  # 'kernel' where the float kernel has a bfloat16 loop (seg.inference.float_kernel), else 'xla'.
  bf16_formulation: str = 'xla'
  # 'kernel' where it has its float32 loops (AVX-512), else 'xla'.
  f32_formulation: str = 'xla'


def parse_flags(cpuinfo: str) -> FrozenSet[str]:
  """The feature flags in /proc/cpuinfo text (x86 'flags', ARM 'Features'): the first CPU's."""
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(':')
    if key.strip() in ('flags', 'Features'):
      return frozenset(value.split())
  return frozenset()


def cpu_flags(path: str = CPUINFO) -> FrozenSet[str]:
  """This machine's CPU feature flags (empty where /proc/cpuinfo is missing)."""
  try:
    with open(path) as f:
      return parse_flags(f.read())
  except OSError:
    return frozenset()


def _override(variable: str, choices: Tuple[str, ...]) -> Optional[str]:
  """The environment variable's value (one of `choices`), or None when unset or 'auto'."""
  value = os.environ.get(variable, 'auto') or 'auto'
  if value == 'auto':
    return None
  if value not in choices:
    raise ValueError(f'{variable} must be auto or one of {choices}, got {value!r}')
  return value


def formulation_override() -> Optional[str]:
  """SEG_INT8_FORMULATION ('int8', 'float32' or 'kernel'), or None when unset or 'auto'."""
  return _override('SEG_INT8_FORMULATION', FORMULATIONS)


def has_avx2_fma(flags: FrozenSet[str], machine: str) -> bool:
  """x86-64 with AVX2 and FMA: what the project's int8 kernel needs (seg.inference.int8_kernel)."""
  return machine.lower() in ('x86_64', 'amd64') and {'avx2', 'fma'} <= flags


def choose(flags: Union[str, Iterable[str], None] = None,
           machine: Optional[str] = None) -> Choice:
  """The XLA flags and int8 formulation for a CPU with `flags` (default: this one's).

  `flags`: a set of names, or /proc/cpuinfo-style text ('flags : fpu ... avx2 ...' or just
  the names separated by spaces). `machine`: platform.machine() (default this one's).
  """
  if flags is None:
    flags = cpu_flags()
  elif isinstance(flags, str):
    flags = parse_flags(flags) if ':' in flags else frozenset(flags.split())
  flags = frozenset(flags)
  machine = (machine or platform.machine()).lower()
  choice = _choose_int8(flags, machine)
  avx512 = has_avx2_fma(flags, machine) and AVX512_FLAGS <= flags
  if avx512:
    choice = dataclasses.replace(choice, f32_formulation='kernel',
                                 reason=f'{choice.reason}; float32 kernel in AVX-512')
  if avx512 and ('amx_bf16' in flags or 'avx512_bf16' in flags):
    loop = 'AMX-BF16 tiles' if 'amx_bf16' in flags else 'AVX-512 BF16'
    choice = dataclasses.replace(choice, bf16_formulation='kernel',
                                 reason=f'{choice.reason}; bfloat16 kernel in {loop}')
  return choice


def float_formulation_override(dtype: str) -> Optional[str]:
  """SEG_BF16_FORMULATION (dtype 'bfloat16') or SEG_F32_FORMULATION ('float32'): 'xla' or
  'kernel', or None when unset or 'auto'."""
  variable = {'bfloat16': 'SEG_BF16_FORMULATION', 'float32': 'SEG_F32_FORMULATION'}[dtype]
  return _override(variable, FLOAT_FORMULATIONS)


def upsample_argmax_override() -> Optional[str]:
  """SEG_UPSAMPLE_ARGMAX: 'xla' or 'kernel' (how the engine's class map upsamples the logits
  and takes their argmax, `seg.inference.engine.upsample_argmax_for`), or None when unset or
  'auto'."""
  return _override('SEG_UPSAMPLE_ARGMAX', FLOAT_FORMULATIONS)


def mask_png_override() -> Optional[str]:
  """SEG_MASK_PNG: 'kernel' or 'zlib' (how predict deflates its mask PNGs,
  `seg.predict.png.kernel`), or None when unset or 'auto'."""
  return _override('SEG_MASK_PNG', ('kernel', 'zlib'))


def _choose_int8(flags: FrozenSet[str], machine: str) -> Choice:
  if flags & {'amx_int8', 'amx_bf16'}:
    return Choice(('--xla_cpu_use_onednn=true',), 'kernel' if 'amx_int8' in flags else 'int8',
                  'AMX: oneDNN kernels, the fused int8 kernel in AMX tiles')
  if has_avx2_fma(flags, machine) and 'avx512_vnni' in flags:
    return Choice((), 'kernel', 'AVX-512 VNNI: the fused int8 kernel, its VNNI loop')
  if has_avx2_fma(flags, machine) and 'avx_vnni' in flags:
    return Choice((), 'kernel', 'AVX-VNNI: the fused int8 kernel, its AVX-VNNI loop')
  if has_avx2_fma(flags, machine):
    return Choice((), 'kernel', 'AVX2 and FMA: the fused int8 kernel, its AVX2 loop')
  if 'avx2' in flags:
    return Choice((), 'int8', 'AVX2: int8 products as fast as float32 or faster')
  if machine in ('aarch64', 'arm64') and 'asimddp' in flags:
    return Choice((), 'int8', 'ARM dot-product instructions')
  return Choice((), 'float32', 'no int8 dot instructions: exact float32 products')
