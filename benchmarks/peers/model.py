"""The peers' network: Hugging Face MobileNetV2ForSemanticSegmentation, output stride 16, random weights.

The config is the one of the hub checkpoint google/deeplabv3_mobilenet_v2_1.0_513
(what transformers' conversion script writes for it: MobileNetV2 1.0, TF
padding, BatchNorm eps 1e-3, 21 PASCAL VOC classes) with one change: output
stride 16 instead of the checkpoint's 8. That is the MobileNetV2 paper's
"MNet V2*, OS16, no ASPP" model (Table 7): 2.11M parameters, ~2.75B
multiply-adds for one 513x513 image, the same network as the project's
experiments/base.py. No hub access is needed: the config is written out here.

transformers' MobileNetV2Model also builds and runs MobileNetV2's final
320->1280 1x1 conv (+BN+ReLU6: 0.41M parameters, 0.45B multiply-adds), whose
output the segmentation head never reads (it takes the 320-channel block
output). `build_model` replaces it with an identity, so every peer (eager
PyTorch too, which would not drop dead code) and the ONNX export run only the
segmentation network.

Weights are random (speed does not depend on their values) but seeded, and so
are the BatchNorm statistics: He-normal convs; BN gamma, beta, running mean and
variance drawn around (1, 0, 0, 1), so that no BN is an identity a compiler
could skip and activations keep a trained network's ~unit scale (float32
denormals or overflow would distort speed and make the int8 calibration
meaningless).
"""

import math

import torch
from torch import nn
from transformers import MobileNetV2Config, MobileNetV2ForSemanticSegmentation

NUM_CLASSES = 21
CONFIG = dict(
    num_channels=3, image_size=513, depth_multiplier=1.0, depth_divisible_by=8, min_depth=8,
    expand_ratio=6.0, output_stride=16,  # the hub checkpoint: 8
    first_layer_is_expansion=True, finegrained_output=True, hidden_act='relu6', tf_padding=True,
    classifier_dropout_prob=0.8, layer_norm_eps=0.001, semantic_loss_ignore_index=255,
    num_labels=NUM_CLASSES, architectures=['MobileNetV2ForSemanticSegmentation'])


class LogitsOnly(nn.Module):
  """forward(pixel_values [N, 3, H, W] float32 in [-1, 1]) -> logits [N, 21, ceil(H/16), ceil(W/16)]."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, pixel_values):
    return self.model(pixel_values=pixel_values, return_dict=False)[0]


def randomize_(model, seed):
  """He-normal conv weights and random BatchNorm parameters and statistics, from `seed`."""
  gen = torch.Generator().manual_seed(seed)

  def uniform(shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=gen)

  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.Conv2d):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2 / fan_in))
        if module.bias is not None:
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
      elif isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(uniform(c, 0.5, 1.5))
        module.bias.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
        module.running_var.copy_(uniform(c, 0.5, 1.5))
  return model


def build_model(seed=0):
  """The OS16 segmentation network in eval mode, 320->1280 conv removed: LogitsOnly module."""
  model = MobileNetV2ForSemanticSegmentation(MobileNetV2Config(**CONFIG))
  model.mobilenet_v2.conv_1x1 = nn.Identity()  # unused by the head, see the module docstring
  return LogitsOnly(randomize_(model, seed)).eval()


def num_params(model):
  """Trainable parameters (BN running statistics are buffers, not counted, as in the paper)."""
  return sum(p.numel() for p in model.parameters())
