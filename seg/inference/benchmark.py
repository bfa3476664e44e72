"""`main.py benchmark`: inference speed of the compiled engine (`seg.inference.engine`) here.

Run through `main.py`, which preloads mimalloc and sets the compilation cache:

    python main.py benchmark --config experiments/base.py --batch-size 8 [--dtype bfloat16|int8] [--json]
    python main.py benchmark --workdir runs/qs --batch-size 1 --measure predict

`--measure network` (the default) times what the peers of `benchmarks/peers/`
(ONNX Runtime, PyTorch) time: float32 images [batch, H, W, 3] in, logits at the output stride out
(preprocessed input; no resize, no argmax). `--measure predict` times the
whole prediction function: uint8 images in, preprocessing, the network, the
aligned-corner resize of the logits to H x W and the argmax, class map out.

Prints median ms per batch, ms per image, images/s, compile time and the peak
resident set of the whole process (and the resident set after JAX started,
before any model existed: the runtime's own baseline); `--json` prints one
JSON line instead, in the format `benchmarks/peers/run.py --extra` reads.
Random weights unless a workdir is given (speed does not depend on values).
"""

import datetime
import os
import platform
import resource
import statistics
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _rss_mib() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def allocator() -> str:
  """Which malloc this process runs with (LD_PRELOAD), as named in the JSON record."""
  preload = os.environ.get('LD_PRELOAD', '')
  for name in ('mimalloc', 'tcmalloc', 'jemalloc'):
    if name in preload:
      return name
  return 'glibc'


def random_variables(model, seed: int = 0) -> Dict[str, Any]:
  """He-initialised NumPy variables of the model's shapes, with nothing compiled.

  (Flax's `init` would compile and run the model once: seconds and ~300 MiB
  of peak memory that are no part of inference.)
  """
  from seg import checkpoint
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ('var', 'scale'):
      return np.ones(leaf.shape, np.float32)
    if name in ('mean', 'bias'):
      return np.zeros(leaf.shape, np.float32)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, checkpoint.abstract_variables(model))


def random_network(config, batch: int, size: int, dtype: str = 'int8'):
  """(compile, engine, images) of the engine in `dtype` for speed measurements (the
  benchmark scripts): random weights and, for int8, fixed input scales (speed does not
  depend on values), `batch` random float32 images of size x size; compile() traces and
  compiles the network as the engine runs it (`Engine.forward`: on a CPU the images one by
  one; logits at the output stride, a function of (engine.folded, images)) anew, reading
  the SEG_* variables then."""
  from seg.inference import engine, quantize
  from seg.model import create_model
  m = config.model
  scales = {name: 6 / 127 for name in quantize.scale_names(m)} if dtype == 'int8' else None
  eng = engine.Engine(config, random_variables(create_model(m)), dtype=dtype, batch_size=1,
                      int8_scales=scales)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)),
                       jnp.float32)

  def compile_network():
    fn = lambda p, x: eng.forward(p, x, upsample=False)  # fresh: SEG_* read again
    return jax.jit(fn).lower(eng.folded, images).compile()
  return compile_network, eng, images


def benchmark(config, workdir: Optional[str] = None, batch_size: int = 1,
              height: Optional[int] = None, width: Optional[int] = None,
              dtype: str = 'float32', measure: str = 'network', warmup: int = 3,
              iters: int = 10, image_by_image: Optional[bool] = None, log=print,
              calibration: Optional[str] = None,
              calibration_count: Optional[int] = None) -> Dict[str, Any]:
  """Times the engine; returns the JSON record (see the module docstring)."""
  from seg import checkpoint
  from seg.inference import engine
  from seg.model import create_model
  if measure not in ('network', 'predict'):
    raise ValueError(f"measure must be 'network' or 'predict', got {measure!r}")
  if iters < 1 or warmup < 0:
    raise ValueError(f'need iters >= 1 and warmup >= 0, got {iters} and {warmup}')
  jax.devices()  # start the runtime before measuring its baseline
  baseline_rss = _rss_mib()
  if workdir:
    config = config or checkpoint.load_config(workdir)
    variables, _ = checkpoint.load_model_variables(workdir, create_model(config.model))
  else:
    if config is None:
      raise ValueError('benchmark needs --config or --workdir')
    variables = random_variables(create_model(config.model))
  height = height or config.data.eval_size
  width = width or config.data.eval_size
  int8_scales = None
  if dtype == 'int8':  # the workdir's calibration; random weights: any scale runs as fast
    from seg.inference.quantize import scale_names
    int8_scales = (engine.int8_scales_for(workdir, config, variables, log, calibration,
                                          calibration_count) if workdir else
                   dict.fromkeys(scale_names(config.model), 6 / 127))
  eng = engine.Engine(config, variables, dtype=dtype, batch_size=batch_size,
                      image_by_image=image_by_image, devices=engine.batch_devices(),
                      int8_scales=int8_scales)
  image_by_image = eng.image_by_image   # None: image by image on a CPU, batched elsewhere
  # As `Engine.run_padded`: equal parts of the batch on the devices, all at once.
  parts = eng.parts(batch_size)
  part = batch_size // parts
  rng = np.random.default_rng(0)
  network = jax.jit(lambda f, x: eng.forward(f, x, upsample=False))
  calls = []
  start = time.perf_counter()
  for device in eng.devices[:parts]:
    on = jax.sharding.SingleDeviceSharding(device)
    folded = eng.folded_on[device]
    if measure == 'network':
      fn = network.lower(folded, jax.ShapeDtypeStruct((part, height, width, 3), jnp.float32,
                                                      sharding=on)).compile()
      x = rng.uniform(-1, 1, (part, height, width, 3)).astype(np.float32)
      calls.append((fn, (folded, jax.device_put(x, device))))
    else:
      fn = eng.compiled('classes', part, height, width, device=device)
      x = rng.integers(0, 256, (part, height, width, 3), dtype=np.uint8)
      sizes = np.tile(np.array([[height, width]], np.int32), (part, 1))
      calls.append((fn, (folded, jax.device_put(x, device), jax.device_put(sizes, device))))

  def run():
    return jax.block_until_ready([fn(*args) for fn, args in calls])
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(warmup):
    run()
  warmup_s = time.perf_counter() - start
  times = []
  for i in range(iters):
    start = time.perf_counter()
    out = run()[0]
    times.append((time.perf_counter() - start) * 1000)
  median = statistics.median(times)
  dtype_name = jnp.dtype(eng.dtype).name
  loop = None
  if eng.int8_formulation == 'kernel':
    from seg.inference import int8_kernel
    loop = int8_kernel.isa()
  elif eng.bf16_formulation == 'kernel':
    from seg.inference import float_kernel
    loop = float_kernel.isa()
  elif eng.f32_formulation == 'kernel':
    from seg.inference import float_kernel
    loop = float_kernel.f32_isa()
  # The class map's upsampling and argmax ('kernel' or 'xla'), where they are timed.
  upsample_argmax = eng.upsample_argmax if measure == 'predict' else None
  record = {
      'peer': 'seg-engine',
      'variant': (f'os{config.model.output_stride}/{dtype_name}/{measure}'
                  f'{f"/{upsample_argmax}-argmax" if upsample_argmax else ""}'
                  f'{"" if image_by_image or batch_size == 1 else "/batched"}'
                  f'{f"/{parts}parts" if parts > 1 else ""}+{allocator()}'),
      'devices': parts,
      'image_by_image': image_by_image,
      'batch': batch_size,
      'input': f'{batch_size}x{height}x{width}x3 '
               f'{"float32" if measure == "network" else "uint8"}',
      'dtype': dtype_name,
      'int8_formulation': eng.int8_formulation,
      'bf16_formulation': eng.bf16_formulation,
      'f32_formulation': eng.f32_formulation,
      # the kernel's loop (int8_kernel.isa, float_kernel.isa or 'avx512'), where it runs
      'int8_loop': loop if eng.int8_formulation else None,
      'bf16_loop': loop if eng.bf16_formulation else None,
      'f32_loop': loop if eng.f32_formulation else None,
      'measure': measure,
      'upsample_argmax': upsample_argmax,
      'warmup': warmup,
      'requested_iters': iters,
      'median_ms': round(median, 3),
      'min_ms': round(min(times), 3),
      'mean_ms': round(statistics.fmean(times), 3),
      'max_ms': round(max(times), 3),
      'stdev_ms': round(statistics.stdev(times), 3) if len(times) > 1 else 0.0,
      'images_per_s': round(batch_size * 1000 / median, 3),
      'ms_per_image': round(median / batch_size, 3),
      'iters': iters,
      'compile_s': round(compile_s, 2),
      'warmup_s': round(warmup_s, 2),
      'output_shape': [batch_size] + list(out.shape[1:]),
      'allocator': allocator(),
      'ld_preload': os.environ.get('LD_PRELOAD', ''),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'device': str(eng.device.device_kind),
      'framework': f'jax {jax.__version__}',
      'width_multiplier': config.model.width,
      'height': height,
      'width': width,
      'nproc': os.cpu_count(),
      'python': platform.python_version(),
      'date_utc': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
      'runtime_baseline_rss_mb': round(baseline_rss, 1),
      'peak_rss_mb': round(_peak_rss_mib(), 1),
      'final_rss_mb': round(_rss_mib(), 1),
  }
  return record


def format_record(r: Dict[str, Any]) -> str:
  """The one-screen summary of a benchmark record."""
  return '\n'.join([
      f'engine {r["dtype"]}'
      + ''.join(f' ({r[f"{d}_formulation"]} formulation'
                + (f', {r[f"{d}_loop"]} loop)' if r.get(f'{d}_loop') else ')')
                for d in ('int8', 'bf16', 'f32') if r.get(f'{d}_formulation'))
      + f', {r["measure"]} ({r["input"]} -> {r["output_shape"]}'
      + (f'; upsampling and argmax: {r["upsample_argmax"]}' if r.get('upsample_argmax') else '')
      + '), '
      f'{r["device"]}, allocator {r["allocator"]}',
      f'  median {r["median_ms"]:.1f} ms per batch of {r["batch"]}  '
      f'(min {r["min_ms"]:.1f}, max {r["max_ms"]:.1f}, {r["iters"]} runs after '
      f'{r["warmup"]} warm-up)',
      f'  {r["ms_per_image"]:.1f} ms/image, {r["images_per_s"]:.1f} images/s'
      + (f' (each batch as {r["devices"]} parts at once on {r["devices"]} devices)'
         if r['devices'] > 1 else ''),
      f'  compile {r["compile_s"]:.1f}s; peak RSS {r["peak_rss_mb"]:.0f} MiB '
      f'(JAX runtime alone: {r["runtime_baseline_rss_mb"]:.0f} MiB)',
  ])

