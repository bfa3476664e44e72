"""DeepLabv3 + MobileNetV2 semantic segmentation in JAX/Flax."""
