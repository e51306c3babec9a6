"""Parallelism applied to the single-device model: mesh, tensor, pipeline and data parallel."""
