"""The device side of a step: model assembly, step inputs, forward, sampling, CUDA graphs."""
