"""A compact PyTorch re-implementation of the reference networks, for parity tests only.

Written from SPEC.md §1-2 and the reference architecture (michaeltrs/DeepSatModels,
read for facts). The module attribute names reproduce the original `state_dict()` names
exactly, e.g. "backbone.en3.0.weight", "backbone.center_out.3.weight",
"attn_sim.rel_h", "fcn.unet_encode.enc3.encode.1.weight",
"crnn_main.clstm.cell_list.0.h_norm.running_mean_5", "main_finalconv.bias", so
`model.state_dict()` is what the original training code saves. Widths the original
hard-codes (UNet3D's 16 features; FCN_CRNN's 16 features and 128 channels) are arguments
here so that tests can build small networks of the same architecture.

Inputs are [B, T, H, W, C] (shape_pattern "NTHWC" of the reference configs); outputs are
what the originals return: embeddings / logits [B, K, H, W], similarities [B, H', W', k, k].
"""

import torch
from torch import nn
import torch.nn.functional as F


def conv_block(dims: int, channels: tuple[int, ...], norm: str = "batch") -> nn.Sequential:
  """Sequential(conv, norm, LeakyReLU, ...): weights at indices 0, 1, 3, 4, ..."""
  conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]
  layers = []
  for cin, cout in zip(channels[:-1], channels[1:]):
    if norm == "batch":
      norm_layer = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](cout)
    else:
      norm_layer = nn.GroupNorm(cout // 16, cout)
    layers += [conv(cin, cout, 3, padding=1), norm_layer, nn.LeakyReLU(inplace=True)]
  return nn.Sequential(*layers)


def up3d(cin: int, cout: int) -> nn.ConvTranspose3d:
  return nn.ConvTranspose3d(cin, cout, 3, stride=2, padding=1, output_padding=1)


class UNet3D(nn.Module):
  """"UNET3D" (dc3 = (4f, 2f), out = classes), or the "UNET3Df" backbone (8f, 8f; 8f)."""

  def __init__(self, num_channels: int, out_channels: int, time_steps: int,
               num_features: int = 16, dc3: tuple[int, int] = (4, 2)):
    super().__init__()
    f = num_features
    self.en3 = conv_block(3, (num_channels, 4 * f, 4 * f))
    self.pool_3 = nn.MaxPool3d(2, 2)
    self.en4 = conv_block(3, (4 * f, 8 * f, 8 * f))
    self.pool_4 = nn.MaxPool3d(2, 2)
    self.center_in = conv_block(3, (8 * f, 16 * f))
    self.center_out = nn.Sequential(*conv_block(3, (16 * f, 16 * f)), up3d(16 * f, 8 * f))
    self.dc4 = conv_block(3, (16 * f, 8 * f, 8 * f))
    self.trans3 = nn.Sequential(up3d(8 * f, 4 * f), nn.BatchNorm3d(4 * f),
                                nn.LeakyReLU(inplace=True))
    self.dc3 = conv_block(3, (8 * f, dc3[0] * f, dc3[1] * f))
    self.final = nn.Conv3d(dc3[1] * f, out_channels, 3, padding=1)
    self.fn = nn.Linear(time_steps, 1)

  def forward(self, x):  # [B, T, H, W, C] -> [B, out, H, W]
    en3 = self.en3(x.permute(0, 4, 1, 2, 3))  # [B, 4f, T, H, W]
    en4 = self.en4(self.pool_3(en3))
    center = self.center_out(self.center_in(self.pool_4(en4)))
    dc4 = self.dc4(torch.cat([center, en4], 1))
    dc3 = self.dc3(torch.cat([self.trans3(dc4), en3], 1))
    final = self.final(dc3).permute(0, 1, 3, 4, 2)  # [B, out, H, W, T]
    return self.fn(final)[..., 0]


class ContextSelfSimilarity(nn.Module):
  """The CSCL head (SPEC.md §1.2) by unfolding the padded keys into k x k windows."""

  def __init__(self, in_channels: int, attn_channels: int, kernel_size: int, stride: int = 1,
               dilation: int = 1, groups: int = 1, norm_emb: bool = True):
    super().__init__()
    self.k, self.s, self.d, self.groups, self.norm_emb = (
        kernel_size, stride, dilation, groups, norm_emb)
    half = attn_channels // 2
    self.rel_h = nn.Parameter(torch.randn(half, 1, 1, kernel_size, 1))
    self.rel_w = nn.Parameter(torch.randn(half, 1, 1, 1, kernel_size))
    self.key_conv = nn.Conv2d(in_channels, attn_channels, 1, bias=False)
    self.query_conv = nn.Conv2d(in_channels, attn_channels, 1, bias=False)

  def forward(self, x):  # [B, E, H, W] -> [B, H', W', k, k]
    k, s, d, g = self.k, self.s, self.d, self.groups
    q = self.query_conv(x)[:, :, ::s, ::s]  # [B, A, H', W']
    span, pad = (k - 1) * d + 1, (k // 2) * d
    key = F.pad(self.key_conv(x), [pad] * 4)
    key = key.unfold(2, span, s).unfold(3, span, s)[..., ::d, ::d]  # [B, A, H', W', k, k]
    key_h, key_w = key.split(key.shape[1] // 2, dim=1)
    key = torch.cat([key_h + self.rel_h, key_w + self.rel_w], dim=1)
    b, a, h, w = q.shape
    q = q.reshape(b, g, a // g, h, w)
    key = key.reshape(b, g, a // g, h, w, k, k)
    if self.norm_emb:
      q, key = F.normalize(q, dim=2), F.normalize(key, dim=2)
    return torch.einsum("bgchw,bgchwij->bhwij", q, key)


class UNet3DCSCL(nn.Module):
  """"UNET3Df": train_stage 0 (backbone + attn_sim) or 2 (backbone + linear_out).

  output_magnification 2 or 4 adds one or two up-blocks "conv_out_x2", "conv_out_x4"
  (ConvTranspose2d 3x3 stride 2 + BatchNorm2d + LeakyReLU) between the two.
  """

  def __init__(self, stage: int, num_channels: int, time_steps: int, num_features: int = 16,
               num_classes: int = 20, attn_channels: int = 128, kernel_size: int = 3,
               output_magnification: int = 1, **cscl):
    super().__init__()
    self.stage = stage
    emb = 8 * num_features
    self.backbone = UNet3D(num_channels, emb, time_steps, num_features, dc3=(8, 8))
    self.up_blocks = [f"conv_out_x{m}" for m in (2, 4)[:output_magnification // 2]]
    for name in self.up_blocks:
      setattr(self, name, nn.Sequential(
          nn.ConvTranspose2d(emb, emb, 3, stride=2, padding=1, output_padding=1),
          nn.BatchNorm2d(emb), nn.LeakyReLU(inplace=True)))
    if stage == 0:
      self.attn_sim = ContextSelfSimilarity(emb, attn_channels, kernel_size, **cscl)
    else:
      self.linear_out = nn.Linear(emb, num_classes)

  def forward(self, x):
    emb = self.backbone(x)  # [B, 8f, H, W]
    for name in self.up_blocks:
      emb = getattr(self, name)(emb)  # [B, 8f, 2H, 2W] each
    if self.stage == 0:
      return self.attn_sim(emb)
    return self.linear_out(emb.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _EncoderBlock(nn.Module):

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.encode = conv_block(2, (cin, cout, cout), norm="group")


class _DecoderBlock(nn.Module):

  def __init__(self, cin: int, middle: int, cout: int):
    super().__init__()
    self.decode = nn.Sequential(*conv_block(2, (cin, middle, middle)),
                                nn.ConvTranspose2d(middle, cout, 2, stride=2))


class UNet2D(nn.Module):
  """The per-frame U-Net (late features): "fcn.unet_encode.*" and "fcn.unet_decode.*"."""

  def __init__(self, num_channels: int, out_channels: int, num_features: int = 16):
    super().__init__()
    f = num_features
    self.unet_encode, self.unet_decode = nn.Module(), nn.Module()
    enc, dec = self.unet_encode, self.unet_decode
    enc.enc3 = _EncoderBlock(num_channels, 4 * f)
    enc.enc4 = _EncoderBlock(4 * f, 8 * f)
    enc.center = conv_block(2, (8 * f, 16 * f), norm="group")
    dec.center_decode = nn.Sequential(*conv_block(2, (16 * f, 16 * f), norm="group"),
                                      nn.ConvTranspose2d(16 * f, 8 * f, 2, stride=2))
    dec.dec4 = _DecoderBlock(16 * f, 8 * f, 4 * f)
    dec.final = nn.Sequential(*conv_block(2, (8 * f, 4 * f, 2 * f)),
                              nn.Conv2d(2 * f, out_channels, 3, padding=1))

  def forward(self, x):  # [N, C, H, W] -> [N, out, H, W]
    enc, dec = self.unet_encode, self.unet_decode
    enc3 = enc.enc3.encode(x)
    enc4 = enc.enc4.encode(F.max_pool2d(enc3, 2))
    center = dec.center_decode(enc.center(F.max_pool2d(enc4, 2)))
    dec4 = dec.dec4.decode(torch.cat([center, enc4], 1))
    return dec.final(torch.cat([dec4, enc3], 1))


class RecurrentNorm2d(nn.Module):
  """BatchNorm with one scale (init 0.1, no offset) and running statistics per time step."""

  def __init__(self, channels: int, time_steps: int):
    super().__init__()
    self.weight = nn.Parameter(torch.full((channels,), 0.1))
    for t in range(time_steps):
      self.register_buffer(f"running_mean_{t}", torch.zeros(channels))
      self.register_buffer(f"running_var_{t}", torch.ones(channels))

  def forward(self, x, t):
    return F.batch_norm(x, getattr(self, f"running_mean_{t}"),
                        getattr(self, f"running_var_{t}"), self.weight, None,
                        self.training, 0.1, 1e-5)


class ConvLSTMCell(nn.Module):

  def __init__(self, cin: int, hidden: int, time_steps: int):
    super().__init__()
    self.h_conv = nn.Conv2d(hidden, 4 * hidden, 3, padding=1)
    self.input_conv = nn.Conv2d(cin, 4 * hidden, 3, padding=1)
    self.h_norm = RecurrentNorm2d(4 * hidden, time_steps)
    self.input_norm = RecurrentNorm2d(4 * hidden, time_steps)
    self.cell_norm = RecurrentNorm2d(hidden, time_steps)

  def forward(self, x, h, c, t):
    gates = self.h_norm(self.h_conv(h), t) + self.input_norm(self.input_conv(x), t)
    i, f, o, g = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * self.cell_norm(torch.tanh(c), t), c

  def run(self, x):  # [B, T, C, H, W] from a zero state -> hidden states [B, T, hidden, H, W]
    b, _, _, height, width = x.shape
    h = c = x.new_zeros(b, self.cell_norm.weight.shape[0], height, width)
    outputs = []
    for t in range(x.shape[1]):
      h, c = self(x[:, t], h, c, t)
      outputs.append(h)
    return torch.stack(outputs, 1)


class FCNCRNN(nn.Module):
  """"UNET2D-CLSTM": stage 0 or 2. Both build `main_finalconv`; stage 0 never uses it."""

  def __init__(self, stage: int, num_channels: int, time_steps: int, num_classes: int = 18,
               num_features: int = 16, hidden: int = 128, attn_channels: int = 128,
               kernel_size: int = 3, **cscl):
    super().__init__()
    self.stage = stage
    self.fcn = UNet2D(num_channels, hidden, num_features)
    self.crnn_main = nn.Module()
    self.crnn_main.clstm = nn.Module()
    self.crnn_main.clstm.cell_list = nn.ModuleList([ConvLSTMCell(hidden, hidden, time_steps)])
    self.main_finalconv = nn.Conv2d(hidden, num_classes, 3, padding=1)
    if stage == 0:
      self.attn_sim = ContextSelfSimilarity(hidden, attn_channels, kernel_size, **cscl)

  def forward(self, x):  # [B, T, H, W, C]
    b, t, h, w, c = x.shape
    frames = self.fcn(x.permute(0, 1, 4, 2, 3).reshape(b * t, c, h, w))
    hidden = self.crnn_main.clstm.cell_list[0].run(frames.reshape(b, t, -1, h, w))
    emb = hidden.mean(1)  # [B, hidden, H, W]
    return self.attn_sim(emb) if self.stage == 0 else self.main_finalconv(emb)


NORMS = (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, RecurrentNorm2d)
LINEAR = (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """Random weights, norm scales/offsets and running statistics, far from their init.

  Weights have variance 1 / fan_in so activations stay O(1) through the network (and
  float32 round-off small); every running mean/variance differs from 0/1.
  """
  gen = torch.Generator().manual_seed(seed)

  def normal(t, std=1.0, mean=0.0):
    t.copy_(mean + std * torch.randn(t.shape, generator=gen))
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, NORMS):
        normal(module.weight, 0.2, 1.0)
        for name, buffer in module.named_buffers():
          if name.startswith("running_mean"):
            normal(buffer, 0.2)
          elif name.startswith("running_var"):
            buffer.copy_(0.5 + torch.rand(buffer.shape, generator=gen))
      elif isinstance(module, LINEAR):
        transposed = isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        fan_in = module.weight.numel() // module.weight.shape[1 if transposed else 0]
        normal(module.weight, fan_in ** -0.5)
      elif isinstance(module, ContextSelfSimilarity):
        normal(module.rel_h)
        normal(module.rel_w)
      if isinstance(module, LINEAR + NORMS) and getattr(module, "bias", None) is not None:
        normal(module.bias, 0.2)
  return model
