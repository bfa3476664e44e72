"""The GPU check: one run that shows the accelerator path works and how fast it is.

    python benchmarks/gpu_check.py [--output benchmarks/results/gpu-check-DATE-DEVICE.json]
    python benchmarks/gpu_check.py --platform cpu --quick      # CI: the same code on a CPU, tiny

Needs only JAX (with CUDA), Flax, Optax, Orbax, NumPy and Pillow: no TensorFlow, no
ml_collections (the project's configs are ml_collections.ConfigDicts; when that package is
missing this script puts a small stand-in in its place, `_ConfigDict` below, enough for the
configs, workdirs and engine used here). It writes one JSON file and prints a table:

- environment: devices, versions; the device's bfloat16 matrix rate (one large product), the
  ceiling the other figures are read against;
- numerics: forward logits and one pmapped training step on the device vs the CPU, the same
  random weights and batch, with `jax_default_matmul_precision=highest` and with the default
  (TF32 on NVIDIA GPUs): relative errors (targets 1e-4 forward, 1e-3 after the step);
- depthwise A/B (SEG_DEPTHWISE 'shifted' vs 'grouped'), forward and backward, float32 and
  bfloat16, at MobileNetV2's shapes (batch 32, dilations 1, 2, 4);
- training step images/s at 513x513, batch 16 and 32, float32 and bfloat16, each depthwise
  form, with compile time and peak device memory, and its share of the ceiling
  (3 x the network's multiply-adds per image, from `summary`);
- engine ms/image at batch 1, 8, 32, float32 and bfloat16 (from input stride 16 on, and
  from 2: SEG_BF16_FROM_STRIDE); bf16-vs-f32 class agreement;
- the `export --platforms cpu,cuda` artifact loaded and run on the device: masks equal to
  the engine's;
- `predict` over 50 generated JPEGs.

--quick shrinks every size (tiny model, 65x65, batch 2, one repetition; one precision, one
depthwise form for the training step, one engine batch size) so that it runs on a CPU in CI
(`tests/test_gpu_check.py`, with TensorFlow and ml_collections hidden); its figures mean
nothing.
"""

import argparse
import datetime
import functools
import json
import os
import platform as platform_lib
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ConfigDict(dict):
  """Stand-in for ml_collections.ConfigDict where that package is absent: attribute access,
  lock/unlock, to_dict/to_json; no field references or type checks."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setattr__(self, name, value):
    if self.__dict__.get('_locked') and name not in self:
      raise AttributeError(f'locked: {name}')
    self[name] = _ConfigDict(value) if isinstance(value, dict) and not isinstance(
        value, _ConfigDict) else value

  def __init__(self, initial=None, **kwargs):
    super().__init__()
    self.__dict__['_locked'] = False
    for key, value in dict(initial or {}, **kwargs).items():
      setattr(self, key, value)

  def lock(self):
    self.__dict__['_locked'] = True
    for value in self.values():
      if isinstance(value, _ConfigDict):
        value.lock()
    return self

  def unlock(self):
    self.__dict__['_locked'] = False
    for value in self.values():
      if isinstance(value, _ConfigDict):
        value.unlock()
    return self

  def unlocked(self):
    import contextlib
    config = self

    @contextlib.contextmanager
    def manager():
      was = config.__dict__['_locked']
      config.unlock()
      try:
        yield config
      finally:
        if was:
          config.lock()
    return manager()

  def to_dict(self):
    return {k: v.to_dict() if isinstance(v, _ConfigDict) else v for k, v in self.items()}

  def to_json(self, **kwargs):
    return json.dumps(self.to_dict(), **kwargs)

  def copy_and_resolve_references(self):
    return _ConfigDict(self.to_dict())


def ensure_ml_collections(force_stand_in: bool = False) -> str:
  """Imports ml_collections, or registers `_ConfigDict` under its name; says which."""
  if not force_stand_in:
    try:
      import ml_collections  # noqa: F401
      return 'ml_collections'
    except ImportError:
      pass
  module = types.ModuleType('ml_collections')
  module.ConfigDict = _ConfigDict
  module.FrozenConfigDict = _ConfigDict
  sys.modules['ml_collections'] = module
  return 'stand-in (benchmarks/gpu_check.py _ConfigDict)'


def _median_ms(fn, repeats):
  import jax
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - start) * 1000)
  times.sort()
  return times[len(times) // 2]


def _replicate_on(device, tree):
  """`tree` with a leading device axis of length 1 on `device`, as a pmapped step's outputs
  are placed (`seg.parallel.replicate` for one given device)."""
  import jax
  from flax import jax_utils
  from seg import parallel
  identity = jax.pmap(lambda x: x, axis_name=parallel.AXIS_NAME, devices=[device])
  return identity(jax_utils.replicate(tree, devices=[device]))


def _rel(a, b):
  import numpy as np
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _peak_bytes(device):
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  return (stats or {}).get('peak_bytes_in_use')


def _config(quick):
  from seg.config import default_config
  config = default_config()
  if quick:
    config.model.width = 0.35
    config.data.crop_size = config.data.eval_size = 65
  return config


def environment(device, quick):
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  import orbax.checkpoint
  import PIL
  n = 512 if quick else 8192
  a = jax.device_put(jnp.ones((n, n), jnp.bfloat16), device)
  product = jax.jit(lambda x: x @ x)
  ms = _median_ms(lambda: product(a), 3 if quick else 10)
  return {'devices': [str(d) for d in jax.local_devices()], 'device_kind': device.device_kind,
          'platform': device.platform, 'python': platform_lib.python_version(),
          'jax': jax.__version__, 'flax': flax.__version__, 'optax': optax.__version__,
          'orbax': orbax.checkpoint.__version__, 'numpy': np.__version__,
          'pillow': PIL.__version__,
          'bf16_matmul_tflops': round(2 * n ** 3 / (ms / 1000) / 1e12, 2),
          'bf16_matmul_size': n}


def numerics(device, config, quick):
  """Device vs CPU on the same random weights: logits, and the state after one step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from seg import parallel
  from seg.model import create_model
  from seg.preprocessing import preprocess
  from seg.train import step as step_lib
  cpu = jax.devices('cpu')[0]
  model = create_model(config.model)
  lr = step_lib.create_learning_rate_fn(config.train)
  size, batch = config.data.crop_size, 2
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, size, size, 3)).astype(np.float32)
  labels = rng.integers(0, config.model.num_classes, (batch, size, size)).astype(np.uint8)
  result = {}
  # --quick: the highest precision only; on the CPU the device is the CPU: computed once.
  for precision in ('highest',) if quick else ('highest', 'default'):
    with jax.default_matmul_precision(precision):
      outs = {}
      for where in (device,) if device.platform == 'cpu' else (device, cpu):
        with jax.default_device(where):
          state = step_lib.create_train_state(jax.random.key(0), config, model, lr)
          logits = jax.jit(lambda v, x: model.apply(v, preprocess(x), train=False))(
              {'params': state.params, 'batch_stats': state.batch_stats}, images)
          p_step = jax.pmap(functools.partial(
              step_lib.train_step, learning_rate_fn=lr, ignore_label=config.data.ignore_label),
              axis_name=parallel.AXIS_NAME, devices=[where])
          put = functools.partial(_replicate_on, where)
          new, _ = p_step(put(state), put({'image': images, 'label': labels}),
                          put(jax.random.key(1)))
          outs[where.platform] = (np.asarray(logits), jax.device_get(
              jax.tree.map(lambda x: x[0], new.params)))
      (l_dev, p_dev), (l_cpu, p_cpu) = outs[device.platform], outs['cpu']
      leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
      result[precision] = {'forward_rel_error': _rel(l_dev, l_cpu),
                           'step_params_rel_error': _rel(leaves(p_dev), leaves(p_cpu))}
  result['targets'] = {'forward': 1e-4, 'step': 1e-3, 'at_precision': 'highest'}
  return result


def depthwise_ab(device, quick):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from seg.model.layers import depthwise_conv
  # MobileNetV2 width 1.0, 513x513, OS16 (dilation 2 in the last blocks) and OS8 (4).
  shapes = ([(2, 17, 17, 16, 1), (2, 9, 9, 24, 2)] if quick else
            [(32, 129, 129, 144, 1), (32, 65, 65, 192, 1), (32, 33, 33, 576, 2),
             (32, 65, 65, 960, 4)])
  rows = []
  for n, h, w, c, dilation in shapes:
    for dtype in ('float32', 'bfloat16'):
      x = jax.device_put(jnp.asarray(np.random.default_rng(0).normal(size=(n, h, w, c)),
                                     dtype), device)
      k = jax.device_put(jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 1, c)),
                                     dtype), device)
      row = {'shape': [n, h, w, c], 'dilation': dilation, 'dtype': dtype}
      for form in ('shifted', 'grouped'):
        fwd = jax.jit(lambda x, k, f=form: depthwise_conv(x, k, 1, dilation, form=f))
        bwd = jax.jit(jax.grad(lambda x, k, f=form: jnp.sum(
            depthwise_conv(x, k, 1, dilation, form=f).astype(jnp.float32)), argnums=(0, 1)))
        row[f'{form}_forward_ms'] = round(_median_ms(lambda: fwd(x, k), 2 if quick else 20), 3)
        row[f'{form}_backward_ms'] = round(_median_ms(lambda: bwd(x, k), 2 if quick else 20), 3)
      rows.append(row)
  return rows


def train_speed(device, config, madds, peak_tflops, quick):
  import jax
  import numpy as np
  from seg import parallel
  from seg.model import create_model
  from seg.train import step as step_lib
  size = config.data.crop_size if quick else 513
  rows = []
  for batch in ((2,) if quick else (16, 32)):
    for dtype in (('float32',) if quick else ('float32', 'bfloat16')):
      for form in ('shifted',) if quick else ('shifted', 'grouped'):
        os.environ['SEG_DEPTHWISE'] = form   # read when the step is traced
        config.train.compute_dtype = dtype
        model = create_model(config.model)
        lr = step_lib.create_learning_rate_fn(config.train)
        with jax.default_device(device):
          state = step_lib.create_train_state(jax.random.key(0), config, model, lr)
        compute = None if dtype == 'float32' else jax.numpy.dtype(dtype)
        p_step = jax.pmap(functools.partial(
            step_lib.train_step, learning_rate_fn=lr, ignore_label=config.data.ignore_label,
            compute_dtype=compute), axis_name=parallel.AXIS_NAME, devices=[device],
            donate_argnums=(0,))
        put = functools.partial(_replicate_on, device)
        rng = np.random.default_rng(0)
        data = put({'image': rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8),
                    'valid': np.tile([[0, size, 0, size]], (batch, 1)).astype(np.int32),
                    'label': rng.integers(0, 21, (batch, size, size)).astype(np.uint8)})
        key = put(jax.random.key(1))
        state = put(state)
        start = time.perf_counter()
        compiled = p_step.lower(state, data, key).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, data, key)
        jax.block_until_ready(metrics)
        steps = 2 if quick else 20
        start = time.perf_counter()
        for _ in range(steps):
          state, metrics = compiled(state, data, key)
        jax.block_until_ready(metrics)
        rate = steps * batch / (time.perf_counter() - start)
        rows.append({'batch': batch, 'size': size, 'dtype': dtype, 'depthwise': form,
                     'images_per_s': round(rate, 2), 'compile_s': round(compile_s, 1),
                     'peak_device_bytes': _peak_bytes(device),
                     'share_of_bf16_ceiling': round(rate * 3 * 2 * madds / (peak_tflops * 1e12),
                                                    4) if peak_tflops else None})
        del state, compiled
  os.environ.pop('SEG_DEPTHWISE', None)
  config.train.compute_dtype = 'float32'
  return rows


def engine_speed(device, config, variables, madds, peak_tflops, quick):
  import numpy as np
  from seg.inference.engine import Engine
  size = config.data.eval_size
  rng = np.random.default_rng(0)
  rows, classes = [], {}
  # bfloat16 from input stride 16 on (the CPU's choice) and from 2 (every layer after the
  # stem, the accelerators' default until this measures it): SEG_BF16_FROM_STRIDE.
  variants = [('float32', None), ('bfloat16', '16'), ('bfloat16', '2')]
  for batch in ((2,) if quick else (1, 8, 32)):
    images = rng.integers(0, 256, (batch, size, size, 3)).astype(np.uint8)
    for dtype, from_stride in variants:
      if from_stride:
        os.environ['SEG_BF16_FROM_STRIDE'] = from_stride   # read when the engine traces
      eng = Engine(config, variables, dtype=dtype, batch_size=batch, devices=[device],
                   image_by_image=False)
      start = time.perf_counter()
      eng.predict(images)
      first_s = time.perf_counter() - start
      ms = _median_ms(lambda: eng.predict(images), 2 if quick else 10)
      classes[(batch, dtype, from_stride)] = eng.predict(images)
      os.environ.pop('SEG_BF16_FROM_STRIDE', None)
      row = {'batch': batch, 'dtype': dtype, 'ms_per_image': round(ms / batch, 3),
             'first_call_s': round(first_s, 1),
             'share_of_bf16_ceiling': round(2 * madds * batch / (ms / 1000) /
                                            (peak_tflops * 1e12), 4) if peak_tflops else None}
      if from_stride:
        row['bf16_from_stride'] = int(from_stride)
        row['bf16_f32_class_agreement'] = round(float(np.mean(
            classes[(batch, dtype, from_stride)] == classes[(batch, 'float32', None)])), 5)
      rows.append(row)
  return rows


def make_workdir(path, config, variables):
  """A workdir (config.json + one orbax checkpoint) of random weights."""
  from seg import checkpoint
  checkpoint.save_config(path, config)
  manager = checkpoint.create_manager(path)
  checkpoint.save_model_only(manager, 1, variables)
  manager.wait_until_finished()


def exported_on_device(device, workdir, config, variables, quick):
  import jax
  import numpy as np
  from jax import export as jax_export
  from seg.inference import export as export_lib
  from seg.inference.engine import Engine
  path = os.path.join(workdir, 'model.jax')
  export_lib.export_workdir(workdir, path, ['cpu', 'cuda'], log=lambda *a: None)
  with open(path, 'rb') as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  size = config.data.eval_size
  images = np.random.default_rng(2).integers(0, 256, (2, size, size, 3)).astype(np.uint8)
  sizes = np.array([[size, size], [size - 7, size - 20]], np.int32)
  with jax.default_device(device):
    masks = np.asarray(exported.call(images, sizes))
  eng = Engine(config, variables, devices=[device], batch_size=2)
  want = eng.predict([images[0], images[1][:size - 7, :size - 20]])
  equal = (np.array_equal(masks[0], want[0]) and
           np.array_equal(masks[1][:size - 7, :size - 20], want[1]))
  return {'platforms': list(exported.platforms), 'bytes': os.path.getsize(path),
          'masks_equal_engine': bool(equal)}


def predict_jpegs(device, workdir, count, quick):
  import numpy as np
  from PIL import Image
  from seg.predict import predict_paths
  from seg.predict.options import Options
  folder = os.path.join(workdir, 'photos')
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(3)
  for i in range(count):
    h, w = (int(rng.integers(40, 90)), int(rng.integers(40, 90))) if quick else (375, 500)
    Image.fromarray(rng.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(
        os.path.join(folder, f'{i:03d}.jpg'), quality=90)
  out = os.path.join(workdir, 'masks')
  start = time.perf_counter()
  # --memory-budget bounds the whole process, which holds every earlier section's arrays here.
  failures = predict_paths(workdir, [folder], out, Options(memory_budget=64 << 30),
                           batch_size=8, devices=[device], log=lambda *a: None,
                           progress_stream=open(os.devnull, 'w'))
  seconds = time.perf_counter() - start
  written = len([n for n in os.listdir(out) if n.endswith('.png') and '_' not in n])
  return {'images': count, 'failures': failures, 'masks_written': written,
          'seconds': round(seconds, 2), 'images_per_s': round(count / seconds, 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--platform', default='', help="'cpu' or 'gpu' (default: JAX's)")
  parser.add_argument('--quick', action='store_true', help='tiny sizes (CI on a CPU)')
  parser.add_argument('--output', default='', help='the JSON file (default: a name with '
                      'the date and device under benchmarks/results/)')
  parser.add_argument('--stand-in-config', action='store_true',
                      help='use the ml_collections stand-in even if the package is there')
  args = parser.parse_args(argv)
  if args.platform:
    os.environ['JAX_PLATFORMS'] = args.platform if args.platform == 'cpu' else f'{args.platform},cpu'
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # peak memory is measured
  sys.path.insert(0, ROOT)   # the GPU machine runs it from a checkout, without pip install -e .
  config_impl = ensure_ml_collections(args.stand_in_config)
  import jax
  from seg.inference.benchmark import random_variables
  from seg.model import complexity, create_model
  device = jax.devices()[0]
  config = _config(args.quick)
  started = time.time()
  record = {'date_utc': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'quick': args.quick, 'config_package': config_impl}
  sections = []

  def section(name, fn):
    start = time.time()
    try:
      record[name] = fn()
    except Exception as e:   # one failing part must not hide the others
      record[name] = {'error': f'{type(e).__name__}: {e}'}
    sections.append((name, time.time() - start))
    print(f'[{time.time() - started:6.1f}s] {name} done', flush=True)

  section('environment', lambda: environment(device, args.quick))
  madds = complexity.describe(_config(args.quick) if args.quick else config)['madds']
  record['madds_per_image'] = madds
  peak = record['environment'].get('bf16_matmul_tflops')
  section('numerics', lambda: numerics(device, config, args.quick))
  section('depthwise_ab', lambda: depthwise_ab(device, args.quick))
  section('train_speed', lambda: train_speed(device, config, madds, peak, args.quick))
  variables = random_variables(create_model(config.model))
  section('engine', lambda: engine_speed(device, config, variables, madds, peak, args.quick))
  with tempfile.TemporaryDirectory() as tmp:
    workdir = os.path.join(tmp, 'run')
    make_workdir(workdir, config, variables)
    section('export', lambda: exported_on_device(device, workdir, config, variables,
                                                 args.quick))
    section('predict', lambda: predict_jpegs(device, workdir, 50 if not args.quick else 6,
                                             args.quick))
  record['seconds'] = round(time.time() - started, 1)
  output = args.output or os.path.join(
      ROOT, 'benchmarks', 'results',
      f'gpu-check-{record["date_utc"][:10]}-{device.device_kind.replace(" ", "-").lower()}.json')
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output, 'w') as f:
    json.dump(record, f, indent=2, default=str)
  print_table(record)
  print(f'wrote {output}')
  return 0 if not any(isinstance(record[n], dict) and 'error' in record[n]
                      for n, _ in sections) else 1


def print_table(r):
  env = r['environment']
  print(f"\n{env.get('device_kind')} ({env.get('platform')}), jax {env.get('jax')}, "
        f"bf16 matmul {env.get('bf16_matmul_tflops')} TFLOP/s; "
        f"{r['madds_per_image']:,} multiply-adds per image")
  for name in ('numerics', 'export', 'predict'):
    print(f'{name:<10} {json.dumps(r[name])}')
  for name in ('depthwise_ab', 'train_speed', 'engine'):
    rows = r[name] if isinstance(r[name], list) else [r[name]]
    print(f'{name}:')
    for row in rows:
      print('  ' + '  '.join(f'{k}={v}' for k, v in row.items()))
  print(f"total {r['seconds']} s")


if __name__ == '__main__':
  sys.exit(main())
