import torch

# A few SGD steps on random data can leave subnormal intermediate values; float64 convolutions
# on subnormals are ~100x slower on CPU. Flushing them keeps the suite fast and changes no
# comparison beyond 1e-308. Shared helpers (randomize_bn, rel_error, snapshot, ...) live in the
# public fxexpand.testing, so tests, benchmarks and users share one copy.
torch.set_flush_denormal(True)
# The suite's models are tiny: on a 2-core machine torch's thread pool costs more than it saves
# (a contract() call takes ~1 s with 2 threads against ~30 ms with one).
torch.set_num_threads(1)
