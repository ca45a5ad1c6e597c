"""Watching a run: the prefetch profiler (events in, nothing out), its reports, routing sources and traces."""
