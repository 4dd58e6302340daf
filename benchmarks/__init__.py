"""Runnable benchmarks; not tests. See each module's docstring for how to run it."""
