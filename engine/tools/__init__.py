"""Tools built on the engine: convert, synth, quantize, recipes, imatrix, info, the demo assets, benchmarks the CLI runs."""
