"""Plain-PyTorch versions of every op: the CPU path and the oracle of the kernel tests."""
