"""The trained variables re-expressed for inference: BatchNorm folded into the convolutions.

Every Conv + BatchNorm (running statistics) becomes one kernel and a bias, so the inference
forward pass (`seg.inference.forward`) is a convolution + bias (+ activation) per layer.
"""

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from seg.model import HEAD_CHANNELS, block_specs


def _fold(conv: Dict[str, Any], bn: Dict[str, Any], stats: Dict[str, Any], epsilon: float,
          xp=jnp) -> Tuple[Any, Any]:
  """Conv kernel [kh, kw, in, out] + inference BatchNorm -> (kernel * s, beta - mean * s).

  s = gamma / sqrt(var + eps), what `nn.BatchNorm(use_running_average=True)`
  multiplies by. `xp` is jnp (inside jit/pmap: `seg.inference.evaluate`) or np (on the
  host: no dispatch of dozens of tiny eager ops, each compiled once).
  """
  f32 = lambda x: xp.asarray(x, xp.float32)
  scale = f32(bn['scale']) / xp.sqrt(f32(stats['var']) + xp.float32(epsilon))
  bias = f32(bn['bias']) - f32(stats['mean']) * scale
  return f32(conv['kernel']) * scale, bias


def fold_variables(model_config, variables: Dict[str, Any], xp=jnp) -> Dict[str, Any]:
  """The model's {'params', 'batch_stats'} as folded inference weights (float32).

  `xp`: jnp (traceable, for use inside jit/pmap) or np (host arrays, no compiling).

  Returns a pytree:
    stem: {w [3, 3, 3, c], b [c]}
    blocks: list of {expand: {w [in, e], b [e]} (absent at t=1), depthwise:
      {w [3, 3, e], b [e]}, project: {w [e, out], b [out]}}
    head: {pool, aspp0, (aspp1-3 [3, 3, c, 256]), proj_pool [256, 256],
      proj_branches [256 * branches, 256], proj_b, logits}
  """
  params, stats = variables['params'], variables['batch_stats']
  enc_p, enc_s = params['MobilenetV2'], stats['MobilenetV2']
  eps_b, eps_h = model_config.backbone_bn_epsilon, model_config.head_bn_epsilon

  def conv_bn(p, s, name, eps, inner='conv'):
    w, b = _fold(p[name][inner], p[name]['BatchNorm'], s[name]['BatchNorm'], eps, xp)
    return w, b

  w, b = conv_bn(enc_p, enc_s, 'Conv', eps_b)
  folded = {'stem': {'w': w, 'b': b}, 'blocks': []}
  for i in range(len(block_specs(model_config.width, model_config.output_stride))):
    name = 'expanded_conv' if i == 0 else f'expanded_conv_{i}'
    p, s = enc_p[name], enc_s[name]
    block = {}
    if 'expand' in p:
      w, b = conv_bn(p, s, 'expand', eps_b)
      block['expand'] = {'w': w[0, 0], 'b': b}
    w, b = conv_bn(p, s, 'depthwise', eps_b, inner='depthwise')
    block['depthwise'] = {'w': w[:, :, 0], 'b': b}
    w, b = conv_bn(p, s, 'project', eps_b)
    block['project'] = {'w': w[0, 0], 'b': b}
    folded['blocks'].append(block)

  hp, hs = params['head'], stats['head']
  head = {}
  w, b = conv_bn(hp, hs, 'image_pooling', eps_h)
  head['pool'] = {'w': w[0, 0], 'b': b}
  w, b = conv_bn(hp, hs, 'aspp0', eps_h)
  head['aspp0'] = {'w': w[0, 0], 'b': b}
  for i in (1, 2, 3):
    if f'aspp{i}' in hp:
      w, b = conv_bn(hp, hs, f'aspp{i}', eps_h)
      head[f'aspp{i}'] = {'w': w, 'b': b}
  w, b = conv_bn(hp, hs, 'concat_projection', eps_h)
  w = w[0, 0]
  # The concat is [pooled, aspp0, aspp1, ...]: split the projection by input rows.
  head['proj_pool'] = w[:HEAD_CHANNELS]
  head['proj_branches'] = w[HEAD_CHANNELS:]
  head['proj_b'] = b
  head['logits'] = {'w': xp.asarray(hp['logits']['kernel'], xp.float32)[0, 0],
                    'b': xp.asarray(hp['logits']['bias'], xp.float32)}
  folded['head'] = head
  return folded


def cast_folded(folded: Dict[str, Any], dtype, xp=jnp) -> Dict[str, Any]:
  """1x1 kernels in `dtype` (what the products read); the rest stays float32.

  Depthwise, stem and 3x3 kernels and all biases feed float32 arithmetic: kept
  float32, they need no conversion op per tap at run time.
  """
  def cast(path, x):
    matrix = path[-1].key in ('w', 'proj_pool', 'proj_branches') and x.ndim == 2
    return xp.asarray(x, dtype if matrix else xp.float32)
  return jax.tree_util.tree_map_with_path(cast, folded)


# ----------------------------------------------------------------------------------------------
