"""clients: what runs on a device: models, data, local training and Flower ClientApps.

Lives here: models, data sources and partitions, the ClientApp, INT8 training, codecs,
PASS and continual learning. Must not: aggregate across devices or schedule the fleet.
"""
