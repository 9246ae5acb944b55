"""Sampling from a model: a batch of prompts of different lengths, a KV cache, temperature, top-k, top-p, stop strings.

    model, model_args, tokenizer = load_model("runs/debug/checkpoints/0000001000")   # lingua.eval.load
    generator = Generator(model, tokenizer, GeneratorArgs(max_gen_len=64, temperature=0.8, top_p=0.95))
    completions, stats = generator.generate(["ROMEO:", "JULIET: O"])

Prompts are left-padded to the longest of their batch (see lingua/models/kv_cache.py): every row decodes into the
same cache slot, each keeps its own RoPE positions (0 at its first real token), and no query attends to padding. The
prompt is prefilled in one forward, then each step feeds one token per row. A row stops at EOS (not part of its
completion), when its completion contains a stop string (cut before it), or after max_gen_len tokens.

Sampling is reproducible: a `torch.Generator` seeded with `seed` at each `generate` call draws every sample, so the
same prompts, seed and batch size give the same completions. temperature == 0 is greedy (argmax).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from lingua.distributed.precision import parse_dtype
from lingua.errors import ConfigError, LinguaError

logger = logging.getLogger(__name__)


@dataclass
class GeneratorArgs:
    temperature: float = 0.0  # 0: greedy
    top_k: Optional[int] = None  # sample among the k most likely tokens
    top_p: Optional[float] = None  # sample among the most likely tokens holding probability top_p (nucleus)
    max_gen_len: int = 256  # new tokens per prompt at most
    max_prompt_len: Optional[int] = None  # longer prompts keep their last tokens; None: model.max_seqlen - max_gen_len
    stop: list[str] = field(default_factory=list)  # a completion ends before the first of these strings
    seed: int = 42  # seeds sampling (temperature > 0)
    dtype: str = "auto"  # auto | fp32 | bf16: what load_model casts the weights to; auto: bf16 on CUDA, else fp32
    batch_size: int = 8  # prompts decoded together
    use_cache: bool = True  # False re-runs the whole sequence every step: slow, a reference for tests and benchmarks
    add_bos: bool = True  # start each prompt with BOS, as training documents do


@dataclass
class GenerationStats:
    prompts: int
    prompt_tokens: int
    generated_tokens: int  # sampled tokens of rows still running, EOS included
    seconds: float
    tok_per_s: float  # generated_tokens / seconds (prefill included)


def check_generator_args(args: GeneratorArgs) -> None:
    if args.temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (got {args.temperature})")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"top_k must be >= 1 or null (got {args.top_k})")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or null (got {args.top_p})")
    if args.max_gen_len < 1:
        raise ConfigError(f"max_gen_len must be >= 1 (got {args.max_gen_len})")
    if args.max_prompt_len is not None and args.max_prompt_len < 1:
        raise ConfigError(f"max_prompt_len must be >= 1 or null (got {args.max_prompt_len})")
    if args.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1 (got {args.batch_size})")
    if args.dtype != "auto":
        parse_dtype(args.dtype)


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (bs, vocab) -> next token ids (bs,): argmax when temperature == 0, else a draw from the tempered
    distribution restricted to the top_k tokens and then to the smallest set holding probability top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (bs, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # (bs, vocab) each
        outside = probs.cumsum(-1) - probs >= top_p  # the tokens before it already hold top_p (the first never is)
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def first_stop(text: str, stop: list[str]) -> Optional[int]:
    """Where the earliest stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


class Generator:
    def __init__(self, model, tokenizer, args: GeneratorArgs):
        check_generator_args(args)
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.max_seqlen = model.args.max_seqlen
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype

    def encode(self, prompt: str, max_gen_len: int) -> list[int]:
        ids = self.tokenizer.encode(prompt, add_bos=self.args.add_bos, add_eos=False)
        if not ids:
            raise LinguaError("an empty prompt needs add_bos=true (the model needs at least one token to start from)")
        limit = self.args.max_prompt_len or self.max_seqlen - max_gen_len
        limit = min(limit, self.max_seqlen - max_gen_len)
        if limit < 1:
            raise LinguaError(f"max_gen_len={max_gen_len} leaves no room for a prompt in model.max_seqlen="
                              f"{self.max_seqlen}: lower max_gen_len")
        if len(ids) > limit:
            logger.warning(f"prompt of {len(ids)} tokens keeps its last {limit} (max_prompt_len / model.max_seqlen)")
            ids = ids[-limit:]
        return ids

    @torch.no_grad()
    def generate(self, prompts: list[str], stop: Optional[list[str]] = None,
                 max_gen_len: Optional[int] = None) -> tuple[list[str], GenerationStats]:
        """Completions of `prompts` (same order) and throughput. `stop`/`max_gen_len` override the args."""
        stop = self.args.stop if stop is None else stop
        max_gen_len = max_gen_len or self.args.max_gen_len
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        encoded = [self.encode(p, max_gen_len) for p in prompts]
        # Longest first: batches of similar lengths waste less on padding; results go back to the callers' order.
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
        rng = torch.Generator(device=self.device).manual_seed(self.args.seed)
        completions: list[str] = [""] * len(prompts)
        generated = 0
        try:
            for k in range(0, len(order), self.args.batch_size):
                idx = order[k: k + self.args.batch_size]
                texts, n = self._generate_batch([encoded[i] for i in idx], stop, max_gen_len, rng)
                generated += n
                for i, text in zip(idx, texts):
                    completions[i] = text
        finally:
            self.model.train(was_training)
        seconds = time.perf_counter() - start
        tok_per_s = generated / max(seconds, 1e-9)
        stats = GenerationStats(len(prompts), sum(map(len, encoded)), generated, seconds, tok_per_s)
        return completions, stats

    def _new_cache(self, bs: int, max_len: int, pad: list[int]):
        """The model's inference state (lingua.models.decoder.Decoder.make_cache: a KV cache, recurrent states); its `.len`
        counts the positions already consumed."""
        return self.model.make_cache(bs, max_len, pad, self.device, self.dtype)

    def _generate_batch(self, prompts: list[list[int]], stop: list[str], max_gen_len: int,
                        rng: torch.Generator) -> tuple[list[str], int]:
        bs, longest = len(prompts), max(map(len, prompts))
        pad = [longest - len(p) for p in prompts]
        tokens = torch.zeros(bs, longest + max_gen_len, dtype=torch.long)  # left-padded prompts, then the samples
        for b, p in enumerate(prompts):
            tokens[b, pad[b]: longest] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        cache = self._new_cache(bs, longest + max_gen_len, pad) if self.args.use_cache else None
        out: list[list[int]] = [[] for _ in range(bs)]
        texts: list[Optional[str]] = [None] * bs  # set when a row is finished
        n_words, eos = self.tokenizer.n_words, self.tokenizer.eos_id
        generated = 0
        for cur in range(longest, longest + max_gen_len):
            if cache is not None:  # prefill the prompts once, then one token per step
                logits = self.model(tokens[:, cache.len: cur], cache=cache)[:, -1]  # (bs, vocab)
            else:  # the reference: the whole sequence again, through a fresh cache for the padded positions
                fresh = self._new_cache(bs, cur, pad)
                logits = self.model(tokens[:, :cur], cache=fresh)[:, -1]
            logits[:, n_words:] = float("-inf")  # ids the tokenizer cannot decode (a vocabulary padded for speed)
            nxt = sample_next(logits, self.args.temperature, self.args.top_k, self.args.top_p, rng)
            tokens[:, cur] = nxt
            for b, t in enumerate(nxt.tolist()):
                if texts[b] is not None:
                    continue
                generated += 1
                if t == eos:
                    texts[b] = self.tokenizer.decode(out[b])
                    continue
                out[b].append(t)
                if stop:
                    text = self.tokenizer.decode(out[b])
                    at = first_stop(text, stop)
                    if at is not None:
                        texts[b] = text[:at]
            if all(t is not None for t in texts):
                break
        return [t if t is not None else self.tokenizer.decode(o) for t, o in zip(texts, out)], generated
