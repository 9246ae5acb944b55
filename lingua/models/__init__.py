"""The models: the decoder shell every architecture shares (embeddings -> blocks -> norm -> output, init, loss),
its layers, the KV cache, the ModelSpec protocol, and one package per architecture (`transformer/`: model,
parallelize, Hugging Face mapping, spec). Models never import train, data or checkpoint code."""
