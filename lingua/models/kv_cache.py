"""The transformer's inference state: keys and values of every token seen so far, so that decoding runs one new
token per step instead of the whole sequence. Training never builds one; `Transformer.make_cache` does, for
lingua.eval.generate.

Prompts of different lengths are left-padded: row b's first `pad[b]` slots are padding, so every row writes its next
token into the same slot and a decode step is one (bs, 1) forward. A real token in slot j has RoPE position
j - pad[b], as if its prompt had no padding; queries never attend to padding slots (a padding query attends to itself
only, which keeps its softmax finite; its output is never read).

Buffers are sized for the model's n_kv_heads, not n_heads (grouped-query attention stores each KV head once):
k[layer], v[layer]: (bs, n_kv_heads, max_len, head_dim). Attention is always SDPA here, whatever model.attn_impl.
"""

import torch
import torch.nn.functional as F

from lingua.errors import LinguaError


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, bs: int, max_len: int, pad=None, device=None,
                 dtype=torch.float32):
        shape = (bs, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        pad = torch.zeros(bs, dtype=torch.long) if pad is None else torch.as_tensor(pad, dtype=torch.long)
        self.pad = pad.to(device)  # (bs,) padding slots at the start of each row
        self.max_len = max_len
        self.len = 0  # slots filled, the same for every row; the model advances it after each forward

    def positions_and_mask(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For `seqlen` new tokens written at slots len..len+seqlen-1: their RoPE positions (bs, seqlen) and the
        SDPA bool mask (bs, 1, seqlen, len + seqlen), True = may attend."""
        if self.len + seqlen > self.max_len:
            raise LinguaError(f"KV cache is full: {self.len} + {seqlen} tokens > {self.max_len} slots")
        device = self.pad.device
        q_slot = torch.arange(self.len, self.len + seqlen, device=device)  # (seqlen,)
        k_slot = torch.arange(self.len + seqlen, device=device)  # (len + seqlen,)
        positions = (q_slot[None, :] - self.pad[:, None]).clamp(min=0)  # (bs, seqlen)
        causal = k_slot[None, :] <= q_slot[:, None]  # (seqlen, len + seqlen)
        real_key = k_slot[None, :] >= self.pad[:, None]  # (bs, len + seqlen)
        mask = causal[None] & (real_key[:, None, :] | (k_slot[None, None, :] == q_slot[None, :, None]))
        return positions, mask.unsqueeze(1)  # (bs, 1, seqlen, len + seqlen)

    def layer(self, i: int) -> "LayerKVCache":
        return LayerKVCache(self, i)


class LayerKVCache:
    """One layer's view of a KVCache: writes the new keys/values, attends over all of them."""

    def __init__(self, cache: KVCache, i: int):
        self.cache, self.i = cache, i

    def update(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xk, xv: (bs, seqlen, n_kv_heads, head_dim) -> keys, values (bs, n_kv_heads, len + seqlen, head_dim)."""
        c, start, end = self.cache, self.cache.len, self.cache.len + xk.shape[1]
        c.k[self.i][:, :, start:end] = xk.transpose(1, 2).to(c.k[self.i].dtype)
        c.v[self.i][:, :, start:end] = xv.transpose(1, 2).to(c.v[self.i].dtype)
        return c.k[self.i][:, :, :end], c.v[self.i][:, :, :end]

    def attend(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Store xk, xv (bs, seqlen, n_kv_heads, head_dim), then attend xq (bs, seqlen, n_heads, head_dim) over every
        cached key; mask (bs, 1, seqlen, kv_len) from `positions_and_mask`. Returns (bs, seqlen, n_heads, head_dim)."""
        keys, values = self.update(xk, xv)  # (bs, n_kv_heads, kv_len, head_dim)
        n_rep = xq.shape[2] // keys.shape[1]
        if n_rep > 1:  # query head h reads kv head h // n_rep, as repeat_kv does in training
            keys, values = keys.repeat_interleave(n_rep, dim=1), values.repeat_interleave(n_rep, dim=1)
        q = xq.transpose(1, 2)  # (bs, n_heads, seqlen, head_dim)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
        return out.transpose(1, 2)
