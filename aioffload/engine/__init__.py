"""The asyncio engine, request state and outputs, and the scheduler (no tensors)."""
