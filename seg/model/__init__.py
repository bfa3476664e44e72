"""The network: MobileNetV2 encoder (`mobilenet_v2.py`) and DeepLabv3 head (`deeplab.py`), built
from TF 'SAME'-padded layers (`layers.py`); `complexity.py` counts parameters and multiply-adds."""

from seg.model.deeplab import HEAD_CHANNELS, DeepLabV3, DeepLabV3MobileNetV2, create_model
from seg.model.mobilenet_v2 import (BACKBONE_SCOPE, DIVISIBLE_BY, STEM_CHANNELS, MobileNetV2,
                                    block_specs, make_divisible, stem_channels)

__all__ = ['HEAD_CHANNELS', 'DeepLabV3', 'DeepLabV3MobileNetV2', 'create_model', 'BACKBONE_SCOPE',
           'DIVISIBLE_BY', 'STEM_CHANNELS', 'MobileNetV2', 'block_specs', 'make_divisible',
           'stem_channels']
