"""Running a model: the Engine API, sampling, pipeline stages on Ray."""
