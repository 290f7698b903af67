"""Hybrid optimization of CIFAR-10 CNNs: structured pruning, int8 quantization, TVM Relax compilation."""

__version__ = "0.1.0"
