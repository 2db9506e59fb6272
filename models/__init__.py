"""bridgepool models: byte-level tokenizer and nanoGPT-style decoder."""
