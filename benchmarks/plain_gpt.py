"""The honest opponent of benchmarks/train_throughput.py: a minimal nanoGPT-style GPT-2 and its training step, with
every trick its users would give it and none of lingua's code.

Pre-LayerNorm blocks without biases (nanoGPT's faster `bias=False`), learned position embeddings, causal
self-attention through F.scaled_dot_product_attention(is_causal=True), a 4x GELU MLP, tied input/output embeddings,
fused AdamW and gradient clipping. Optional torch.compile of the whole model and bf16 autocast; a fixed random batch,
so no data loader, no logging and no checkpoints cost it anything.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 512
    vocab_size: int = 4096


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=False)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=False)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=False)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.h = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd, bias=False)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * c.n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))

    def flops_per_token(self, seq_len: int) -> int:
        """6 N + 12 L H (C/H) T, N the non-embedding matmul weights plus the output projection (PaLM accounting, as
        lingua counts its own model)."""
        dim, n_layer = self.wte.embedding_dim, len(self.h)
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith(("wte", "wpe")))
        n += self.lm_head.weight.numel()  # tied to wte (so skipped above), but a matmul all the same
        return 6 * n + 12 * n_layer * dim * seq_len


def train_steps(config: GPTConfig, batch_size: int, steps: int, dtype: torch.dtype, compile: bool,
                seed: int = 0, on_step=None, device: str = "cpu") -> list[float]:
    """Wall time of each training step (forward, backward, clip, fused AdamW) on one fixed random batch; `on_step`
    (e.g. a profiler's step) is called after each, outside the timing. On CUDA each step ends with a synchronize
    (so the time is the step's), with TF32 matmuls as nanoGPT sets them."""
    torch.manual_seed(seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = GPT(config).to(device)
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    x = torch.randint(0, config.vocab_size, (batch_size, config.block_size + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast:
            loss = step_model(inputs, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step()
    return times
