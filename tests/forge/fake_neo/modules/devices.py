"""Device helpers, like ``modules.devices`` (CPU, full precision)."""

import contextlib

import torch

device = torch.device("cpu")
dtype = torch.float32


def autocast(disable: bool = False):
    return contextlib.nullcontext()
