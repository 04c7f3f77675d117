import torch

# A few SGD steps on random data can leave subnormal intermediate values; float64 convolutions
# on subnormals are ~100x slower on CPU. Flushing them keeps the suite fast and changes no
# comparison beyond 1e-308. Shared helpers (randomize_bn, rel_error, snapshot, ...) live in the
# public fxexpand.testing, so tests, benchmarks and users share one copy.
torch.set_flush_denormal(True)
