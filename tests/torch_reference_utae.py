"""A compact PyTorch rebuild of U-TAE (VSainteuf/utae-paps), for parity tests only.

Written from the paper and the original's architecture (utae-paps `src/backbones/utae.py`,
`ltae.py`, `positional_encoding.py`, read for facts). Module attribute names reproduce the
original `UTAE.state_dict()` names exactly, e.g. "in_conv.conv.conv.0.weight",
"down_blocks.2.conv2.conv.1.bias", "up_blocks.0.skip_conv.1.running_var",
"temporal_encoder.attention_heads.Q", "temporal_encoder.mlp.1.running_mean",
"out_conv.conv.conv.4.weight", so `UTAE(...).state_dict()` is what utae-paps saves under
"state_dict". Defaults: the original's "att_group" skips, GroupNorm encoder, reflect padding.

Inputs as the original's: bands [B, T, C, H, W] and dates [B, T]; a date is padding where
all its bands equal the pad value 0. Output: logits [B, K, H, W], or with `encoder=True`
the decoder's feature maps [B, d0, H, W].
"""

import torch
from torch import nn
import torch.nn.functional as F

import torch_reference as tr


class ConvLayer(nn.Module):
  """conv.{0, 3, ...} Conv2d (reflect), conv.{1, 4, ...} norm, ReLU after each."""

  def __init__(self, widths, norm="batch", k=3, s=1, p=1):
    super().__init__()
    layers = []
    for cin, cout in zip(widths[:-1], widths[1:]):
      norm_layer = nn.GroupNorm(4, cout) if norm == "group" else nn.BatchNorm2d(cout)
      layers += [nn.Conv2d(cin, cout, k, s, p, padding_mode="reflect"), norm_layer, nn.ReLU()]
    self.conv = nn.Sequential(*layers)

  def forward(self, x):
    return self.conv(x)


def shared_over_dates(block, x, pad_value=0.0):
  """block on every non-padded date of x [B, T, C, H, W]; padded dates output pad_value."""
  b, t = x.shape[:2]
  frames = x.reshape(b * t, *x.shape[2:])
  pad = (frames == pad_value).flatten(1).all(1)
  out = block(frames[~pad])
  full = out.new_full((b * t, *out.shape[1:]), pad_value)
  full[~pad] = out
  return full.reshape(b, t, *out.shape[1:])


class ConvBlock(nn.Module):

  def __init__(self, widths, norm="batch"):
    super().__init__()
    self.conv = ConvLayer(widths, norm)

  def forward(self, x):
    return self.conv(x)


class DownConvBlock(nn.Module):

  def __init__(self, d_in, d_out):
    super().__init__()
    self.down = ConvLayer([d_in, d_in], "group", k=4, s=2, p=1)
    self.conv1 = ConvLayer([d_in, d_out], "group")
    self.conv2 = ConvLayer([d_out, d_out], "group")

  def forward(self, x):
    out = self.conv1(self.down(x))
    return out + self.conv2(out)


class UpConvBlock(nn.Module):

  def __init__(self, d_in, d_out, d_skip):
    super().__init__()
    self.skip_conv = nn.Sequential(nn.Conv2d(d_skip, d_skip, 1), nn.BatchNorm2d(d_skip),
                                   nn.ReLU())
    self.up = nn.Sequential(nn.ConvTranspose2d(d_in, d_out, 4, 2, 1), nn.BatchNorm2d(d_out),
                            nn.ReLU())
    self.conv1 = ConvLayer([d_out + d_skip, d_out])
    self.conv2 = ConvLayer([d_out, d_out])

  def forward(self, x, skip):
    out = self.conv1(torch.cat([self.up(x), self.skip_conv(skip)], 1))
    return out + self.conv2(out)


def sinusoid_table(dates, channels, repeat, period=1000.0):
  """[B, T] -> [B, T, channels * repeat]: sin on even, cos on odd channels, tiled."""
  exponent = 2 * (torch.arange(channels) // 2).float() / channels
  angles = dates[..., None].float() / torch.pow(torch.tensor(period), exponent)
  table = torch.where(torch.arange(channels) % 2 == 0, torch.sin(angles), torch.cos(angles))
  return table.repeat(1, 1, repeat)


class MultiHeadAttention(nn.Module):

  def __init__(self, n_head, d_k, d_in):
    super().__init__()
    self.Q = nn.Parameter(torch.zeros(n_head, d_k))
    self.fc1_k = nn.Linear(d_in, n_head * d_k)


class LTAE2d(nn.Module):
  """Per-pixel L-TAE in eval mode; returns features [B, C, h, w] and masks [n, B, T, h, w]."""

  def __init__(self, in_channels, n_head, d_k, d_model):
    super().__init__()
    self.n_head, self.d_k = n_head, d_k
    self.inconv = nn.Conv1d(in_channels, d_model, 1)
    self.attention_heads = MultiHeadAttention(n_head, d_k, d_model)
    self.in_norm = nn.GroupNorm(n_head, in_channels)
    self.out_norm = nn.GroupNorm(n_head, in_channels)
    self.mlp = nn.Sequential(nn.Linear(d_model, in_channels), nn.BatchNorm1d(in_channels),
                             nn.ReLU())

  def forward(self, x, dates, pad):
    b, t, c, h, w = x.shape
    n, d_k = self.n_head, self.d_k
    seq = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, c, t)  # one series per pixel
    seq = self.inconv(self.in_norm(seq)).transpose(1, 2)  # [N, T, d_model]
    d_model = seq.shape[-1]
    per_pixel = lambda a: a[:, None, None].expand(b, h, w, *a.shape[1:]).reshape(
        b * h * w, *a.shape[1:])
    seq = seq + per_pixel(sinusoid_table(dates, d_model // n, n))
    keys = self.attention_heads.fc1_k(seq).reshape(b * h * w, t, n, d_k)
    pad = per_pixel(pad)
    outputs, masks = [], []
    for i in range(n):
      scores = keys[:, :, i] @ self.attention_heads.Q[i] / d_k ** 0.5  # [N, T]
      att = torch.softmax(scores.masked_fill(pad, -1e3), dim=1)
      width = d_model // n
      outputs.append((att[..., None] * seq[:, :, i * width:(i + 1) * width]).sum(1))
      masks.append(att.reshape(b, h, w, t).permute(0, 3, 1, 2))
    out = self.out_norm(self.mlp(torch.cat(outputs, 1)))
    return out.reshape(b, h, w, c).permute(0, 3, 1, 2), torch.stack(masks)


def aggregate(x, masks, pad):
  """Skip [B, T, C, H, W] averaged over time, channel group i with mask i (resized)."""
  n = masks.shape[0]
  width = x.shape[2] // n
  groups = []
  for i in range(n):
    att = F.interpolate(masks[i], size=x.shape[-2:], mode="bilinear", align_corners=False)
    att = att * (~pad).float()[:, :, None, None]  # [B, T, H, W]
    groups.append((att[:, :, None] * x[:, :, i * width:(i + 1) * width]).sum(1))
  return torch.cat(groups, 1)


class UTAE(nn.Module):
  """utae-paps UTAE (defaults: PASTIS, 10 bands, 20 classes)."""

  def __init__(self, input_dim=10, encoder_widths=(64, 64, 64, 128),
               decoder_widths=(32, 32, 64, 128), out_conv=(32, 20), n_head=16, d_model=256,
               d_k=4, encoder=False):
    super().__init__()
    self.encoder = encoder
    stages = len(encoder_widths)
    self.in_conv = ConvBlock([input_dim, encoder_widths[0], encoder_widths[0]], "group")
    self.down_blocks = nn.ModuleList(
        DownConvBlock(encoder_widths[i], encoder_widths[i + 1]) for i in range(stages - 1))
    self.up_blocks = nn.ModuleList(
        UpConvBlock(decoder_widths[i], decoder_widths[i - 1], encoder_widths[i - 1])
        for i in range(stages - 1, 0, -1))
    self.temporal_encoder = LTAE2d(encoder_widths[-1], n_head, d_k, d_model)
    self.out_conv = ConvBlock([decoder_widths[0], *out_conv])

  def forward(self, bands, dates):  # [B, T, C, H, W], [B, T]
    pad = (bands == 0).flatten(2).all(2)  # [B, T]
    maps = [shared_over_dates(self.in_conv, bands)]
    for block in self.down_blocks:
      maps.append(shared_over_dates(block, maps[-1]))
    out, masks = self.temporal_encoder(maps[-1], dates, pad)
    for i, block in enumerate(self.up_blocks):
      out = block(out, aggregate(maps[-(i + 2)], masks, pad))
    return out if self.encoder else self.out_conv(out)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """tr.randomize_, plus the L-TAE's BatchNorm1d, Conv1d and master queries."""
  tr.randomize_(model, seed)
  gen = torch.Generator().manual_seed(seed + 1)
  normal = lambda t, std, mean=0.0: t.copy_(mean + std * torch.randn(t.shape, generator=gen))
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm1d):
        normal(module.weight, 0.2, 1.0)
        normal(module.bias, 0.2)
        normal(module.running_mean, 0.2)
        module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=gen))
      elif isinstance(module, nn.Conv1d):
        normal(module.weight, module.weight.shape[1] ** -0.5)
        normal(module.bias, 0.2)
      elif isinstance(module, MultiHeadAttention):
        normal(module.Q, 1.0)
  return model
