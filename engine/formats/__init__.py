"""Files: GGUF reading, the tokenizer from GGUF metadata, atomic (temporary name + rename) writes."""
