"""Analysis of trained runs: latent-space statistics, plots and the HTML report.

- :mod:`distdrgn.analysis.latent`: PCA, k-means, on-data centres, PC traversals, UMAP.
- :mod:`distdrgn.analysis.plots`: matplotlib (Agg) figures.
- :mod:`distdrgn.analysis.report`: the self-contained ``report.html``.
- :mod:`distdrgn.analysis.analyze`: the ``distdrgn analyze`` pipeline.
"""
