"""PyTorch rebuilds of the reference BiConvGRU and TSViT, for parity tests only.

Written from SPEC.md §2 and the originals (DeepSatModels `models/BiConvRNN/`,
`models/TSViT/TSViTdense.py`, read for facts) in the pattern of torch_reference.py: the
module attribute names reproduce the original `state_dict()` names exactly, e.g.
"forward_model.cell_list.0.update_gate.weight", "outconv.bias",
"temporal_transformer.layers.3.1.fn.net.3.weight", "mlp_head.1.weight", and `forward`
computes what the original does:

  BiRNNSequentialEncoder (architecture "ConvBiRNN", backbone "ConvGRU"):
    forward((inputs [B, T, H, W, C], inputs_backward, seq_lengths [B])) ->
    log-probabilities [B, K, H, W]; inputs_backward is what its data pipeline makes:
    the real dates reversed, then zero-padded (`backward_inputs`).
  TSViT: forward(inputs [B, T, H, W, C], last channel doy / 365.0001) -> scores
    [B, K, H, W], the day index truncated as the original does, every date attended,
    and the patches put back at their 2-D positions (the upstream fix of issue 22).
"""

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import torch_reference


class ConvGRUCell(nn.Module):

  def __init__(self, cin: int, hidden: int):
    super().__init__()
    self.reset_gate = nn.Conv2d(cin + hidden, hidden, 3, padding=1)
    self.update_gate = nn.Conv2d(cin + hidden, hidden, 3, padding=1)
    self.out_gate = nn.Conv2d(cin + hidden, hidden, 3, padding=1)

  def forward(self, x, h):
    stacked = torch.cat([x, h], 1)
    update = torch.sigmoid(self.update_gate(stacked))
    reset = torch.sigmoid(self.reset_gate(stacked))
    out = torch.tanh(self.out_gate(torch.cat([x, h * reset], 1)))
    return h * (1 - update) + out * update


class ConvGRU(nn.Module):

  def __init__(self, cin: int, hidden: int):
    super().__init__()
    self.cell_list = nn.ModuleList([ConvGRUCell(cin, hidden)])

  def forward(self, x):  # [B, C, T, H, W] -> all states [B, T, hidden, H, W]
    cell = self.cell_list[0]
    b, _, t, height, width = x.shape
    h = x.new_zeros(b, cell.out_gate.out_channels, height, width)
    states = []
    for i in range(t):
      h = cell(x[:, :, i], h)
      states.append(h)
    return torch.stack(states, 1)


class BiConvGRU(nn.Module):
  """"ConvBiRNN" with backbone "ConvGRU" (France: 14 channels, 20 classes)."""

  def __init__(self, num_channels: int = 14, num_classes: int = 20, conv3d_dim: int = 64,
               hidden: int = 256):
    super().__init__()
    self.inconv = nn.Conv3d(num_channels, conv3d_dim, (1, 3, 3))
    self.forward_model = ConvGRU(conv3d_dim, hidden)
    self.backward_model = ConvGRU(conv3d_dim, hidden)
    self.outconv = nn.Conv2d(2 * hidden, num_classes, 3)

  def forward(self, inputs):
    forward_in, backward_in, seq_lengths = inputs
    last = seq_lengths - 1
    states = []
    for x, model in ((forward_in, self.forward_model), (backward_in, self.backward_model)):
      x = self.inconv(F.pad(x.permute(0, 4, 1, 2, 3), (1, 1, 1, 1)))  # [B, D, T, H, W]
      out = model(x)
      states.append(torch.stack([out[i, j] for i, j in enumerate(last)]))
    state = F.pad(torch.cat(states, 1), (1, 1, 1, 1))
    return F.log_softmax(self.outconv(state), dim=1)


def backward_inputs(x: np.ndarray, seq_lengths: np.ndarray) -> np.ndarray:
  """The original pipeline's inputs_backward: each series' real dates reversed, zero-padded."""
  out = np.zeros_like(x)
  for i, length in enumerate(seq_lengths):
    out[i, :length] = x[i, :length][::-1]
  return out


class Attention(nn.Module):

  def __init__(self, dim: int, heads: int, dim_head: int):
    super().__init__()
    inner = heads * dim_head
    self.heads, self.scale = heads, dim_head ** -0.5
    self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
    project = not (heads == 1 and dim_head == dim)
    self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.)) if project else (
        nn.Identity())

  def forward(self, x):  # [S, L, dim]
    s, length, _ = x.shape
    q, k, v = (t.reshape(s, length, self.heads, -1).transpose(1, 2)
               for t in self.to_qkv(x).chunk(3, dim=-1))  # [S, heads, L, d]
    attn = (torch.einsum("shid,shjd->shij", q, k) * self.scale).softmax(dim=-1)
    out = torch.einsum("shij,shjd->shid", attn, v).transpose(1, 2).reshape(s, length, -1)
    return self.to_out(out)


class PreNorm(nn.Module):

  def __init__(self, dim: int, fn: nn.Module):
    super().__init__()
    self.norm, self.fn = nn.LayerNorm(dim), fn

  def forward(self, x):
    return self.fn(self.norm(x))


class FeedForward(nn.Module):

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.),
                             nn.Linear(hidden, dim), nn.Dropout(0.))

  def forward(self, x):
    return self.net(x)


class Transformer(nn.Module):

  def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int):
    super().__init__()
    self.layers = nn.ModuleList([
        nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)),
                       PreNorm(dim, FeedForward(dim, mlp_dim))]) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim)

  def forward(self, x):
    for attn, ff in self.layers:
      x = attn(x) + x
      x = ff(x) + x
    return self.norm(x)


class TSViT(nn.Module):
  """Dense TSViT; defaults: the PASTIS24 config (1,657,476 parameters)."""

  def __init__(self, img_res: int = 24, patch_size: int = 2, num_channels: int = 11,
               num_classes: int = 19, dim: int = 128, temporal_depth: int = 4,
               spatial_depth: int = 4, heads: int = 4, dim_head: int = 32,
               scale_dim: int = 4):
    super().__init__()
    self.p, self.k, self.dim = patch_size, num_classes, dim
    self.g = img_res // patch_size
    patch_dim = (num_channels - 1) * patch_size ** 2
    self.to_patch_embedding = nn.Sequential(nn.Identity(), nn.Linear(patch_dim, dim))
    self.to_temporal_embedding_input = nn.Linear(366, dim)
    self.temporal_token = nn.Parameter(torch.randn(1, num_classes, dim))
    mlp = dim * scale_dim
    self.temporal_transformer = Transformer(dim, temporal_depth, heads, dim_head, mlp)
    self.space_pos_embedding = nn.Parameter(torch.randn(1, self.g ** 2, dim))
    self.space_transformer = Transformer(dim, spatial_depth, heads, dim_head, mlp)
    self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, patch_size ** 2))

  def forward(self, x):  # [B, T, H, W, C]
    x = x.permute(0, 1, 4, 2, 3)  # [B, T, C, H, W]
    b, t, c, _, _ = x.shape
    p, g, k, dim = self.p, self.g, self.k, self.dim
    day = (x[:, :, -1, 0, 0] * 365.0001).to(torch.int64)  # the original's truncation
    temporal = self.to_temporal_embedding_input(
        F.one_hot(day, num_classes=366).to(torch.float32))  # [B, T, dim]
    # 'b t c (h p1) (w p2) -> (b h w) t (p1 p2 c)'
    x = x[:, :, :-1].reshape(b, t, c - 1, g, p, g, p).permute(0, 3, 5, 1, 4, 6, 2)
    x = self.to_patch_embedding(x.reshape(b * g * g, t, p * p * (c - 1)))
    x = (x.reshape(b, -1, t, dim) + temporal.unsqueeze(1)).reshape(-1, t, dim)
    x = torch.cat([self.temporal_token.expand(x.shape[0], -1, -1), x], 1)
    x = self.temporal_transformer(x)[:, :k]
    x = x.reshape(b, g * g, k, dim).permute(0, 2, 1, 3).reshape(b * k, g * g, dim)
    x = self.space_transformer(x + self.space_pos_embedding)
    x = self.mlp_head(x.reshape(-1, dim)).reshape(b, k, g * g, p * p).permute(0, 2, 3, 1)
    # 'b (h w) (p1 p2) k -> b k (h p1) (w p2)'
    x = x.reshape(b, g, g, p, p, k).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, k, g * p, g * p)


def randomize_(model: nn.Module, seed: int) -> nn.Module:
  """torch_reference.randomize_, plus random LayerNorm scales and offsets."""
  torch_reference.randomize_(model, seed)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.LayerNorm):
        module.weight.copy_(1 + 0.2 * torch.randn(module.weight.shape, generator=gen))
        module.bias.copy_(0.2 * torch.randn(module.bias.shape, generator=gen))
  return model
