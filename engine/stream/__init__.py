"""Expert streaming: the slot pool and cache policies, the reader threads, the store the model fetches experts from, the memory budget."""
