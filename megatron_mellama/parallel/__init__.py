"""Parallelism applied to the single-device model: mesh, tensor, context, pipeline and data parallel,
composed in one order by `parallelize.parallelize`."""
