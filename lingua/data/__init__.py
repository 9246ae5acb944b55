"""Data: tokenizers, documents (jsonl) and pre-tokenized shards, world-size-invariant streams, the resumable packing
loader (sync or in a child process), validation batches."""
