"""Placement, the plan, pinned host memory and the transfer queue."""
