"""Dataset generation: Sentinel-2 products + parcel polygons -> a TFDS dataset (SPEC.md §6).

products.py reads tiles (both product layouts), parcels.py rasterises labels, windows.py lays out
windows and splits, pipeline.py builds the examples (plain loop or Apache Beam), __main__.py is
`python -m cscl_jax.datagen`.
"""
