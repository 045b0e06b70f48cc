"""PyTorch twins of rtjax's image families (LeNet-5, the ResNet-style CNN,
the ViT) on the same weights, written as a PyTorch user would write them:
NCHW, nn.Conv2d/MaxPool2d/BatchNorm2d, scaled_dot_product_attention,
BatchNorm fused into its conv by torch's own fuse_conv_bn_eval.

They are translations, so they name the families' layers; they live here,
beside the peers that time them, so torch stays out of rtjax.models and out
of rtjax's dependencies (torch is imported only when a twin is built).
"""

from __future__ import annotations

import math

import numpy as np
from flax import nnx

FAMILIES = ("lenet5", "resnet", "vit")


def _tensor(torch, array, transpose=None):
  array = np.array(array, np.float32)  # a writable copy for torch
  return torch.from_numpy(np.ascontiguousarray(
      array if transpose is None else np.transpose(array, transpose)))


def _linear(torch, layer: nnx.Linear):
  out = torch.nn.Linear(*layer.kernel.shape, bias=layer.bias is not None)
  with torch.no_grad():
    out.weight.copy_(_tensor(torch, layer.kernel[...], (1, 0)))
    if layer.bias is not None:
      out.bias.copy_(_tensor(torch, layer.bias[...]))
  return out


def _conv(torch, layer: nnx.Conv, padding=0):
  kh, kw, cin, cout = layer.kernel.shape
  strides = layer.strides if isinstance(layer.strides, (tuple, list)) else (
      (layer.strides or 1),) * 2
  out = torch.nn.Conv2d(cin, cout, (kh, kw), stride=tuple(strides),
                        padding=padding, bias=layer.bias is not None)
  with torch.no_grad():
    out.weight.copy_(_tensor(torch, layer.kernel[...], (3, 2, 0, 1)))
    if layer.bias is not None:
      out.bias.copy_(_tensor(torch, layer.bias[...]))
  return out


def _batchnorm(torch, bn: nnx.BatchNorm):
  out = torch.nn.BatchNorm2d(bn.scale.shape[0], eps=bn.epsilon).eval()
  with torch.no_grad():
    for name, value in (("weight", bn.scale), ("bias", bn.bias),
                        ("running_mean", bn.mean), ("running_var", bn.var)):
      getattr(out, name).copy_(_tensor(torch, value[...]))
  return out


def _same_conv_bn(torch, conv: nnx.Conv, bn: nnx.BatchNorm):
  """flax's SAME padding (the extra row/column low-side last, as XLA pads)
  then the conv with its BatchNorm fused."""
  from torch.nn.utils.fusion import fuse_conv_bn_eval
  k = conv.kernel.shape[0]
  stride = conv.strides if isinstance(conv.strides, int) else conv.strides[0]
  fused = fuse_conv_bn_eval(_conv(torch, conv).eval(), _batchnorm(torch, bn))

  class SameConv(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.conv = fused

    def forward(self, x):
      pads = []
      for size in (x.shape[3], x.shape[2]):  # F.pad: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
      return self.conv(torch.nn.functional.pad(x, pads))
  return SameConv()


def _lenet5(torch, model, spec):
  c2 = spec["args"]["conv_channels"][1]
  side = int(round((model.fc1.kernel.shape[0] / c2) ** 0.5))
  fc1 = _linear(torch, model.fc1)
  # flax flattens HWC, torch CHW: fc1's input rows permuted to match.
  rows = np.arange(side * side * c2).reshape(side, side, c2).transpose(2, 0, 1)
  with torch.no_grad():
    fc1.weight.copy_(_tensor(torch, np.asarray(model.fc1.kernel[...])[
        rows.ravel()], (1, 0)))
  nn = torch.nn
  return nn.Sequential(
      _conv(torch, model.conv1), nn.ReLU(), nn.MaxPool2d(2),
      _conv(torch, model.conv2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
      fc1, nn.ReLU(), _linear(torch, model.fc2), nn.ReLU(),
      _linear(torch, model.head))


def _resnet(torch, model, spec):
  del spec
  nn = torch.nn

  class Block(nn.Module):
    def __init__(self, block):
      super().__init__()
      self.conv1 = _same_conv_bn(torch, block.conv1, block.conv1_bn)
      self.conv2 = _same_conv_bn(torch, block.conv2, block.conv2_bn)
      self.proj = (_same_conv_bn(torch, block.proj, block.proj_bn)
                   if block.proj is not None else nn.Identity())

    def forward(self, x):
      y = self.conv2(torch.relu(self.conv1(x)))
      return torch.relu(y + self.proj(x))

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = _same_conv_bn(torch, model.stem, model.stem_bn)
      self.blocks = nn.Sequential(*[Block(b) for b in model.blocks])
      self.head = _linear(torch, model.head)

    def forward(self, x):
      x = self.blocks(torch.relu(self.stem(x)))
      return self.head(x.mean(dim=(2, 3)))
  return ResNet()


def _vit(torch, model, spec):
  nn, F = torch.nn, torch.nn.functional

  def norm(layer):
    out = nn.LayerNorm(layer.scale.shape[0], eps=layer.epsilon)
    with torch.no_grad():
      out.weight.copy_(_tensor(torch, layer.scale[...]))
      out.bias.copy_(_tensor(torch, layer.bias[...]))
    return out

  class Block(nn.Module):
    def __init__(self, block):
      super().__init__()
      a = block.attention
      self.heads, self.head_dim = a.num_heads, a.head_dim
      self.norm1, self.norm2 = norm(block.norm1), norm(block.norm2)
      self.q, self.k, self.v, self.out = (
          _linear(torch, l) for l in (a.query, a.key, a.value, a.out))
      self.mlp_in, self.mlp_out = (_linear(torch, block.mlp_in),
                                   _linear(torch, block.mlp_out))

    def forward(self, x):
      b, t, _ = x.shape
      h = self.norm1(x)
      split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)
      attended = F.scaled_dot_product_attention(
          split(self.q(h)), split(self.k(h)), split(self.v(h)))
      x = x + self.out(attended.transpose(1, 2).reshape(b, t, -1))
      return x + self.mlp_out(F.gelu(self.mlp_in(self.norm2(x)),
                                     approximate="tanh"))  # jax.nn.gelu's

  class ViT(nn.Module):
    def __init__(self):
      super().__init__()
      self.patch = _conv(torch, model.patch_embed)
      self.position = nn.Parameter(_tensor(torch, model.position[...]))
      self.blocks = nn.Sequential(*[Block(b) for b in model.blocks])
      self.norm, self.head = norm(model.norm), _linear(torch, model.head)

    def forward(self, x):
      x = self.patch(x).flatten(2).transpose(1, 2) + self.position
      return self.head(self.norm(self.blocks(x)).mean(dim=1))
  return ViT()


def twin(model: nnx.Module, spec: dict):
  """The family's PyTorch module in eval mode (NCHW input), or None when
  the family has no twin; raises ImportError without torch."""
  import torch
  build = {"lenet5": _lenet5, "resnet": _resnet, "vit": _vit}.get(spec["name"])
  if build is None or spec.get("quantization"):
    return None
  return build(torch, model, spec).eval()
