"""``distdrgn dashboard``: a browser view of a trained run, served by the standard library.

:mod:`~distdrgn.dashboard.data` gathers the per-particle variables (latents, PCA, UMAP,
k-means, CTF, poses, numeric columns of the source .star/.cs); :mod:`~distdrgn.dashboard.server`
serves them as float32 arrays, with the selection, volume and trajectory endpoints, to the
page in ``static/`` (vanilla JS canvas scatter, no network access).
"""
