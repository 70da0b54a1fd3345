"""Training the fused models (which live in ``zoo``): the LightningModule, data sources and the feature cache,
callbacks, sweeps over heads and stages, dataset builders, and the ``fusion-zoo`` command line."""
