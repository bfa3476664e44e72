"""`main.py summary`: parameters, multiply-adds and feature shapes of a configured model."""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from seg.model.deeplab import DeepLabV3, create_model
from seg.model.mobilenet_v2 import InvertedResidual, MobileNetV2, block_specs


def describe(config) -> Dict:
  """Counts for the model of `config` at a `config.data.eval_size` square input.

  Multiply-adds are counted exactly per convolution, output elements x
  (input channels / groups) x kernel taps, as the MobileNetV2 paper does (BN,
  activations, pooling and resizes not counted). Nothing is computed: the
  model is only traced.
  """
  model = create_model(config.model)
  size = config.data.eval_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)
  traced = {}

  def forward(variables, images):
    logits, state = model.apply(
        {'params': variables['params'], 'batch_stats': variables['batch_stats']}, images,
        mutable=['madds', 'intermediates'],
        capture_intermediates=lambda mdl, method: method == '__call__' and isinstance(
            mdl, (InvertedResidual, MobileNetV2, DeepLabV3)))
    traced.update(state)  # sown multiply-adds are Python ints while tracing
    return logits

  logits = jax.eval_shape(forward, variables, images)
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  backbone = traced['intermediates']['MobilenetV2']
  specs = block_specs(config.model.width, config.model.output_stride, config.model.divisible_by)
  blocks = [('expanded_conv' if i == 0 else f'expanded_conv_{i}', spec) for i, spec in
            enumerate(specs)]
  return {
      'trainable_params': count(variables['params']),
      'batch_stats': count(variables['batch_stats']),
      'madds': int(sum(jax.tree.leaves(traced['madds']))),
      'input_shape': images.shape,
      'output_stride': config.model.output_stride,
      'features_shape': backbone['__call__'][0].shape,
      'logits_shape': logits.shape,
      'blocks': [(name, expanded, out, stride, dilation, backbone[name]['__call__'][0].shape)
                 for name, (expanded, out, stride, dilation) in blocks],
  }


def format_summary(config, info: Dict) -> str:
  """One screen: per-block table, then totals."""
  m = config.model
  lines = [f'DeepLabv3 ({m.head} head) on MobileNetV2 width {m.width}, '
           f'output stride {m.output_stride}, {m.num_classes} classes',
           f'{"block":<18}{"expand":>7}{"out":>6}{"stride":>7}{"rate":>5}  output shape']
  for name, expanded, out, stride, dilation, shape in info['blocks']:
    lines.append(f'{name:<18}{expanded:>7}{out:>6}{stride:>7}{dilation:>5}  {shape}')
  lines += [
      f'input                   {info["input_shape"]}',
      f'encoder features        {info["features_shape"]} (output stride {info["output_stride"]})',
      f'logits                  {info["logits_shape"]}',
      f'trainable parameters    {info["trainable_params"]:,}',
      f'BatchNorm statistics    {info["batch_stats"]:,}',
      f'multiply-adds           {info["madds"]:,} ({info["madds"] / 1e9:.2f}B at '
      f'{info["input_shape"][1]}x{info["input_shape"][2]})',
  ]
  return '\n'.join(lines)
