"""Tiny: the smallest configuration that runs every path in seconds (tests and smoke runs).

    python main.py train --config experiments/tiny.py --workdir /tmp/tiny

It learns little; it exists so that code paths can be exercised on a CPU.
"""

from seg.config import default_config


def get_config():
  config = default_config()
  config.model.width = 0.35
  config.model.backbone_bn_momentum = 0.9
  config.model.head_bn_momentum = 0.9
  config.data.crop_size = 65
  config.data.eval_size = 161
  config.train.steps = 4
  config.train.from_scratch = True
  config.train.batch_size = 4
  config.train.learning_rate = 0.02
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.keep_checkpoints = 2
  config.train.eval_every = 0
  config.eval.batch_size = 4
  return config
