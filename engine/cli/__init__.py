"""The `weightstream` command: one module per command group."""
