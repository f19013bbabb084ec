"""The benchmark harness behind `make bench` (`scripts/bench.py`): this service against TorchServe and a
hand-written FastAPI server on the same model, driven by wrk on loopback.

- `procs`: servers as process trees on free loopback ports, stopped on every exit path; their memory;
- `wrk`: the load generator and its Lua script (status codes, Retry-After, latency percentiles);
- `peers`: how each server is started; `torchserve` builds its model archive and config;
- `handwritten`: the hand-written server; `ts_handler`: TorchServe's handler (packaged into the archive);
- `report`: the tables, ratios and goals; `install`: what the benchmark needs, installed when missing.
"""
