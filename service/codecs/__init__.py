"""The APIs' codecs: HTTP bodies in, model inputs out, and outcomes back into bodies.

`/v1` and `/v2` differ only here; preprocessing, batching and calibration are one shared
path (`service.pipeline`).
"""
