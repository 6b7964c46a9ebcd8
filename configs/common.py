"""Shared defaults for every cscl_jax run (the paper's settings, SPEC.md §1.4 and §3).

Not a launch config itself: `pretrain.py`, `finetune.py` and `supervised.py` import
`get_config()` from here and change a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the default configuration (UNet3Df on the synthetic SITS benchmark)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Activation dtype: 'float32' or 'bfloat16' (params and optimizer stay float32).
  config.dtype = "float32"

  # The network: everything needed to build it (cscl_jax.models.create_model).
  config.model = ml_collections.ConfigDict()
  # unet3df | unet3d | unet2d_convlstm | biconvgru | tsvit | utae
  config.model.name = "unet3df"
  # pretrain: encoder + CSCL similarity head; finetune / supervised: encoder + classifier.
  config.model.stage = "pretrain"
  config.model.num_channels = 14  # 13 bands + day of year
  config.model.max_seq_len = 16  # T
  config.model.img_res = 48  # H = W
  config.model.num_classes = 12  # crop classes of the dataset; unknown is not a class
  config.model.num_features = 16  # f in SPEC.md §2 (UNet3Df/UNet3D)
  config.model.emb_channels = 128  # encoder output features
  config.model.attn_channels = 128  # CSCL head A
  config.model.kernel_size = 3  # CSCL window k
  config.model.stride = 1
  config.model.dilation = 1
  config.model.groups = 1
  config.model.norm_emb = True
  # Super-resolution (unet3df, SPEC.md §5): 2 or 4 maps 10 m inputs to 5 m / 2.5 m outputs,
  # trained on the dataset's labels_x2 / labels_x4 (real fine ground truths).
  config.model.output_magnification = 1
  # BiConvGRU (SPEC.md §2; names of the original's MODEL keys): the shared (1,3,3) Conv3d's
  # width and each direction's hidden channels; its embedding has 2 * rnn_hidden_dim.
  config.model.conv3d_dim = 64
  config.model.rnn_hidden_dim = 256
  # TSViT (SPEC.md §2, PASTIS24 settings; the original's MODEL keys). Its embedding is
  # its num_classes per-pixel scores.
  config.model.patch_size = 2
  config.model.dim = 128
  config.model.temporal_depth = 4
  config.model.spatial_depth = 4
  config.model.heads = 4
  config.model.dim_head = 32
  config.model.scale_dim = 4  # MLP width = scale_dim * dim

  # The data; shapes are the model's (a mismatch with the data is an error at start-up).
  config.dataset = ml_collections.ConfigDict()
  config.dataset.name = "sits_synthetic"  # TFDS builder name
  config.dataset.config = "default"  # TFDS builder config
  config.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default
  config.dataset.manual_dir = ml_collections.config_dict.placeholder(str)
  config.dataset.train_split = "train"
  config.dataset.eval_split = "validation"
  config.dataset.img_res = config.model.get_ref("img_res")
  config.dataset.max_seq_len = config.model.get_ref("max_seq_len")
  config.dataset.num_channels = config.model.get_ref("num_channels")
  config.dataset.num_classes = config.model.get_ref("num_classes")
  config.dataset.label_magnification = config.model.get_ref("output_magnification")
  # Which max_seq_len dates to keep: "first" (the reference's cut, used for T31TFM) or
  # "even" (evenly spaced by index, first and last kept: by acquisition, not by day of year).
  config.dataset.time_sampling = "even"
  config.dataset.shuffle_buffer = 512
  config.dataset.prefetch = 2

  # CSCL loss (pre-training only).
  config.cscl = ml_collections.ConfigDict()
  config.cscl.loss = "contrastive"  # contrastive | bce
  config.cscl.pos_weight = 0.125
  config.cscl.use_mask = False  # reference default: no mask

  # Optimisation: Adam, lr decayed x lr_decay per epoch.
  config.batch_size = 32  # global
  config.learning_rate = 1e-4
  config.lr_decay = 0.975
  config.num_epochs = 100
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.steps_per_epoch = -1  # -1: train examples // batch_size

  # BatchNorm statistics to evaluate (and checkpoint) with: 0 keeps the running averages
  # (the reference); N > 0 recomputes them before every evaluation as the mean over the
  # next N training batches (cscl_jax/precise_bn.py: with small batches the running
  # averages can cost 0.4 mIoU on one evaluation and not the next). With freeze_encoder
  # they are recomputed once, before the first step, and kept.
  config.precise_bn_batches = 0

  # Logging, evaluation, checkpoints.
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.num_eval_batches = -1  # -1: the whole eval split
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 2  # latest N, plus the best by eval mIoU
  config.num_plot_samples = 4
  config.init_from = ""  # finetune: a pre-training workdir or checkpoint dir
  # Linear probe: train only the head; the encoder's params get zero updates and it runs in
  # inference mode (BatchNorm running statistics used and kept). Default False.
  config.freeze_encoder = False
  # Multi-host: call jax.distributed.initialize() (auto-detects Cloud TPU pods, SLURM,
  # Open MPI). Also done, whatever this says, when JAX_COORDINATOR_ADDRESS is set (see main.py).
  config.distributed = False
  return config
