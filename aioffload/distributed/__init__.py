"""Tensor parallelism: rank groups, Megatron sharding arithmetic, the collectives a step needs, rank launch."""
