"""Bytes and files, below the layers: tensor containers (.safetensors, .pt, shards, DCP), writers, paths.

Knows tensors and files, never EP configs: nothing here imports :mod:`epcli.layers` or above.
"""
