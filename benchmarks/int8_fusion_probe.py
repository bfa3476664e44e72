"""One of the network's products ([8712 x 960] x [960 x 320], a batch of 8 at stride 16) in
float32, bfloat16 and int8, bare and with the int8 engine's quantise / dequantise around it.

    python benchmarks/int8_fusion_probe.py
    XLA_FLAGS=--xla_cpu_use_onednn=true python benchmarks/int8_fusion_probe.py

Median of 15 runs after 3 warm-ups; prints ms and GMAdd/s per variant (docs/performance.md).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

M, K, N = 8712, 960, 320
rng = np.random.default_rng(0)
xf = jnp.asarray(rng.uniform(-1, 1, (M, K)), jnp.float32)
xq = jnp.asarray(rng.integers(-127, 128, (M, K)), jnp.int8)
wq = jnp.asarray(rng.integers(-127, 128, (K, N)), jnp.int8)
wf = jnp.asarray(rng.uniform(-1, 1, (K, N)), jnp.float32)
wb = wf.astype(jnp.bfloat16)
s = jnp.ones((N,), jnp.float32) * 0.01
dims = (((1,), (0,)), ((), ()))
fns = {
 'f32 bare': (lambda x, w: lax.dot_general(x, w, dims, preferred_element_type=jnp.float32), xf, wf),
 'bf16 bare': (lambda x, w: lax.dot_general(x.astype(jnp.bfloat16), w, dims, preferred_element_type=jnp.float32), xf, wb),
 'int8 bare': (lambda x, w: lax.dot_general(x, w, dims, preferred_element_type=jnp.int32), xq, wq),
 'int8 fused q/dq': (lambda x, w: jnp.clip(lax.dot_general(jnp.clip(jnp.round(x * 100.), -127, 127).astype(jnp.int8), w, dims, preferred_element_type=jnp.int32).astype(jnp.float32) * s + 0.1, 0, 6), xf, wq),
 'int8 q, barrier, dq': (lambda x, w: jnp.clip(lax.optimization_barrier(lax.dot_general(lax.optimization_barrier(jnp.clip(jnp.round(x * 100.), -127, 127).astype(jnp.int8)), w, dims, preferred_element_type=jnp.int32)).astype(jnp.float32) * s + 0.1, 0, 6), xf, wq),
}
for name, (f, x, w) in fns.items():
  g = jax.jit(f).lower(x, w).compile()
  for _ in range(3): g(x, w).block_until_ready()
  ts = []
  for _ in range(15):
    t = time.perf_counter(); g(x, w).block_until_ready(); ts.append(time.perf_counter() - t)
  ms = sorted(ts)[7] * 1000
  print(f'{name:24s} {ms:7.2f} ms  {M*K*N/ms/1e6:7.0f} GMAdd/s', flush=True)
