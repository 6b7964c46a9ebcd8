"""BiConvGRU: a bidirectional convolutional GRU over the dates (SPEC.md §2).

The reference "ConvBiRNN" with backbone "ConvGRU" (DeepSatModels
`models/BiConvRNN/biconv_rnn.py`, after MTLCC-pytorch):

  1. A Conv3d with kernel (1, 3, 3), 'same' zero padding, shared by both directions,
     maps every date [H, W, C] to [H, W, conv3d_dim].
  2. A forward ConvGRU reads the dates in order, a backward one in reverse, each from
     a zero state: update and reset gates and a candidate, each a 3x3 conv of
     [input, state] (or [input, reset * state]); h' = (1 - u) h + u tanh(candidate).
  3. The two final states, concatenated (forward first), are the per-pixel embedding
     [B, H, W, 2 * rnn_hidden_dim] that the reference's 3x3 classifier reads.

Padded dates (`dates.valid_dates`) leave the state unchanged, so each direction's final
state is that of the real dates alone: the reference's `seq_lengths` (it reads the
forward state at the last real date and runs the backward GRU on the reversed real dates
padded at the end) for series padded at the end, and the same rule for any padding.
The reference returns log-probabilities; ours returns the classifier's logits (same
cross-entropy, same argmax).

With the France settings (14 channels, conv3d_dim 64, rnn_hidden_dim 256) the encoder
has 4,433,344 parameters; with the 20-class 3x3 classifier 4,525,524.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cscl_jax.models import dates
from cscl_jax.models import layers


class ConvGRUCell(nn.Module):
  """One masked ConvGRU step; `nn.scan` runs it over time (carry: the state).

  Attributes:
    hidden: hidden channels.
    dtype: computation dtype.
  """
  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, inputs: tuple[jax.Array, jax.Array]
               ) -> tuple[jax.Array, None]:
    """h [B, H, W, hidden], (x [B, H, W, C], valid [B]) -> (h', None)."""
    x, valid = inputs

    def gate(name):  # Conv2d 3x3 of [input, state] with bias, PyTorch init.
      return nn.Conv(self.hidden, (3, 3), padding=1, dtype=self.dtype,
                     kernel_init=layers.TORCH_DEFAULT_INIT, name=name)

    stacked = jnp.concatenate([x, h], axis=-1)  # [B, H, W, C + hidden]
    update = nn.sigmoid(gate("update_gate")(stacked))
    reset = nn.sigmoid(gate("reset_gate")(stacked))
    candidate = jnp.tanh(gate("out_gate")(jnp.concatenate([x, h * reset], axis=-1)))
    new = h * (1 - update) + candidate * update
    return jnp.where(valid[:, None, None, None], new, h), None  # padding: h unchanged


class BiConvGRU(nn.Module):
  """Reference BiConvGRU encoder: [B, T, H, W, C] -> embeddings [B, H, W, 2 * hidden].

  No normalisation layers, so no batch statistics; any T, H and W.

  Attributes:
    num_channels: input channels C (bands + day of year).
    conv3d_dim: channels of the shared (1, 3, 3) input convolution.
    rnn_hidden_dim: hidden channels of each direction's ConvGRU.
    dtype: computation dtype; parameters stay float32.
  """
  num_channels: int = 14
  conv3d_dim: int = 64
  rnn_hidden_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """Maps [B, T, H, W, C] to [B, H, W, 2 * rnn_hidden_dim]; `train` changes nothing."""
    del train  # No dropout or batch statistics.
    if x.ndim != 5 or x.shape[-1] != self.num_channels:
      raise ValueError(f"BiConvGRU expects inputs [B, T, H, W, {self.num_channels}] "
                       f"(model.num_channels); got shape {x.shape}.")
    valid = dates.valid_dates(x)  # [B, T]
    x = nn.Conv(self.conv3d_dim, (1, 3, 3), padding=((0, 0), (1, 1), (1, 1)),
                dtype=self.dtype, kernel_init=layers.TORCH_DEFAULT_INIT,
                name="inconv")(x)  # [B, T, H, W, conv3d_dim]
    # One-layer ConvGRUs from a zero state, unrolled like the ConvLSTM
    # (unet2d_convlstm.py): T is small and XLA:CPU runs convolution gradients inside a
    # loop much slower than unrolled.
    scan = nn.scan(ConvGRUCell, variable_broadcast="params", split_rngs={"params": False},
                   in_axes=1, out_axes=1, unroll=x.shape[1])
    b, _, h, w, _ = x.shape
    zeros = jnp.zeros((b, h, w, self.rnn_hidden_dim), self.dtype)
    gru = lambda name: scan(self.rnn_hidden_dim, dtype=self.dtype, name=name)
    forward, _ = gru("forward")(zeros, (x, valid))  # final state [B, H, W, hidden]
    backward, _ = gru("backward")(zeros, (x[:, ::-1], valid[:, ::-1]))  # [B, H, W, hidden]
    return jnp.concatenate([forward, backward], axis=-1)  # [B, H, W, 2 hidden]
