"""The model: config from GGUF metadata, weights by llama.cpp tensor name, the forward pass."""
