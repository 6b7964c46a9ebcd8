"""cscl_jax: Context-Self Contrastive Loss pre-training for SITS crop segmentation in JAX.

`cscl_jax.cscl` holds the loss maths and imports nothing else of ours, so users can
`from cscl_jax import cscl` in their own code.
"""
