"""strategies: Flower message-based strategies and wrappers that run on the server.

Lives here: deadline/straggler handling, compressed-update decoding, async buffering.
Must not: train models, emulate devices or drive the fleet's clock.
"""
