"""Self-speculative greedy decoding (Stern et al. 2018's blockwise parallel decoding, as Gloeckle et al. 2024 use it):
the extra heads draft, the next-token head verifies, and the output is exactly the greedy output.

One forward feeds K = n_future_head tokens per row: c, the greedy token already known, then the K - 1 drafts d_1..d_{K-1}
the extra heads proposed at c's position (head k guesses token t + k + 1). Head 0's argmax after each input, g_0..g_{K-1},
is what greedy decoding would pick there, so draft d_j is right iff d_1..d_j all equal g_0..g_{j-1}. With m drafts
accepted the step emits d_1..d_m and g_m (m + 1 tokens, up to K), the cache drops the K - 1 - m rejected positions
(`cache.len -= ...`; their slots are overwritten next), and the heads' outputs at the last accepted position give the
next c and drafts. A batch accepts the fewest drafts any running row accepted, so every row stays greedy (and a batch
gains little: one KV-cache length is shared by all rows).

It pays when tokens per forward exceed what a speculative forward (K tokens through the trunk and every head) costs
relative to a greedy one (1 token through the trunk and head 0). With the debug config's 2-block trunk on CPU that
ratio is ~1.7, more than 2 heads can win back; a deep trunk with 1-block heads, or a GPU, makes it close to 1.

    python -m apps.mtp.speculative ckpt_dir=runs/mtp_debug prompt="ROMEO:" max_gen_len=200

prints the completions and the speed of plain greedy decoding (KV cache, one token per forward, next-token head only)
against self-speculative decoding, on the same prompts; both completions must be identical.
"""

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from apps.mtp.model import MTPTransformer
from lingua.args import run_cli
from lingua.errors import ConfigError, LinguaError
from lingua.eval.load import TokenizerOverride, load_model, pick_device
from lingua.log import setup_logging


@dataclass
class DecodeStats:
    generated_tokens: int = 0
    forwards: int = 0  # model calls, prefill included
    row_forwards: int = 0  # forwards times the rows each one decoded
    seconds: float = 0.0

    @property
    def tok_per_s(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)

    @property
    def tokens_per_forward(self) -> float:
        """Tokens each row gains per forward: 1 for greedy, up to n_draft + 1 speculating."""
        return self.generated_tokens / max(self.row_forwards, 1)


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, list[int]]:
    longest = max(map(len, prompts))
    pad = [longest - len(p) for p in prompts]
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, pad[b]:] = torch.tensor(p, dtype=torch.long)
    return tokens.to(device), pad


def _finish(rows: list[list[int]], max_gen_len: int, eos_id: Optional[int]) -> list[list[int]]:
    """Cut each row at max_gen_len tokens and before its first EOS."""
    out = []
    for r in rows:
        r = r[:max_gen_len]
        out.append(r[: r.index(eos_id)] if eos_id is not None and eos_id in r else r)
    return out


def _argmax(model: MTPTransformer, h: torch.Tensor, n_words: Optional[int]) -> torch.Tensor:
    """Greedy tokens from normed head states (..., dim): argmax of the logits over the decodable ids."""
    logits = model.logits(h)
    if n_words is not None:
        logits = logits[..., :n_words]  # ids the tokenizer cannot decode (a vocabulary padded for speed)
    return logits.argmax(-1)


def _running(rows: list[list[int]], max_gen_len: int, eos_id: Optional[int]) -> list[bool]:
    return [len(r) < max_gen_len and (eos_id is None or eos_id not in r) for r in rows]


@torch.no_grad()
def greedy_decode(model: MTPTransformer, prompts: list[list[int]], max_gen_len: int, eos_id: Optional[int] = None,
                  n_words: Optional[int] = None) -> tuple[list[list[int]], DecodeStats]:
    """The baseline: greedy with a KV cache over the trunk and the next-token head, one token per forward.
    Returns the generated ids per prompt (cut before EOS) and the timing."""
    device, dtype = model.freq_cos.device, next(model.parameters()).dtype
    start = time.perf_counter()
    tokens, pad = _left_pad(prompts, device)
    cache = model.make_cache(len(prompts), tokens.shape[1] + max_gen_len, pad, device, dtype, heads=1)
    rows: list[list[int]] = [[] for _ in prompts]
    stats = DecodeStats()
    inp = tokens
    while any(_running(rows, max_gen_len, eos_id)):
        h = model.forward_heads(inp, cache)[0][:, -1]  # (bs, dim)
        stats.forwards += 1
        nxt = _argmax(model, h, n_words)  # (bs,)
        for r, t in zip(rows, nxt.tolist()):
            r.append(t)
        inp = nxt[:, None]
    stats.seconds = time.perf_counter() - start
    stats.row_forwards = stats.forwards * len(prompts)
    rows = _finish(rows, max_gen_len, eos_id)
    stats.generated_tokens = sum(len(r) for r in rows)
    return rows, stats


@torch.no_grad()
def speculative_decode(model: MTPTransformer, prompts: list[list[int]], max_gen_len: int,
                       eos_id: Optional[int] = None, n_words: Optional[int] = None,
                       n_draft: Optional[int] = None) -> tuple[list[list[int]], DecodeStats]:
    """Greedy decoding that drafts `n_draft` tokens per forward with heads 1..n_draft (default: every extra head) and
    keeps those head 0 agrees with. Same result as `greedy_decode`, in fewer forwards."""
    k_max = model.args.n_future_head - 1
    n_draft = k_max if n_draft is None else n_draft
    if not 0 <= n_draft <= k_max:
        raise LinguaError(f"n_draft={n_draft}: the model has {k_max} extra head(s) to draft with")
    device, dtype = model.freq_cos.device, next(model.parameters()).dtype
    start = time.perf_counter()
    tokens, pad = _left_pad(prompts, device)
    bs, longest = tokens.shape
    # room for the drafts of the last step, within the positions the model was built for
    max_len = min(longest + max_gen_len + n_draft, model.args.max_seqlen)
    if longest + max_gen_len > max_len:
        raise LinguaError(f"prompt ({longest} tokens) + max_gen_len={max_gen_len} exceed "
                          f"model.max_seqlen={model.args.max_seqlen}")
    cache = model.make_cache(bs, max_len, pad, device, dtype, heads=n_draft + 1)
    stats = DecodeStats()

    def guesses(hs: list[torch.Tensor], pos) -> torch.Tensor:
        """(bs, n_draft): what heads 1..n_draft say at position `pos`, all projected in one matmul."""
        if not n_draft:
            return torch.empty(bs, 0, dtype=torch.long, device=device)
        return _argmax(model, torch.stack([h[:, pos] for h in hs[1:]], 1), n_words)

    hs = model.forward_heads(tokens, cache)  # prefill: n_draft + 1 states (bs, longest, dim)
    stats.forwards += 1
    c = _argmax(model, hs[0][:, -1], n_words)  # (bs,) the next greedy token, known for sure
    drafts = guesses(hs, -1)  # (bs, n_draft)
    rows: list[list[int]] = [[t] for t in c.tolist()]
    while True:
        running = _running(rows, max_gen_len, eos_id)
        if not any(running):
            break
        n = min(n_draft, cache.max_len - cache.len - 1)  # near the end of the cache, draft fewer
        hs = model.forward_heads(torch.cat([c[:, None], drafts[:, :n]], 1), cache)  # (bs, n + 1) tokens in
        stats.forwards += 1
        g = _argmax(model, hs[0], n_words)  # (bs, n + 1): the greedy token after each input
        g_rows, d_rows = g.tolist(), drafts[:, :n].tolist()
        m = n  # drafts every running row's head 0 confirms, from the first on
        for b in range(bs):
            if running[b]:
                k = 0
                while k < m and d_rows[b][k] == g_rows[b][k]:
                    k += 1
                m = k
        cache.len -= n - m  # forget the rejected drafts' positions
        for r, d, gr in zip(rows, d_rows, g_rows):
            r.extend(d[:m] + [gr[m]])
        c = g[:, m]
        drafts = guesses(hs, m)
    stats.seconds = time.perf_counter() - start
    stats.row_forwards = stats.forwards * len(prompts)
    rows = _finish(rows, max_gen_len, eos_id)
    stats.generated_tokens = sum(len(r) for r in rows)
    return rows, stats


# ---------------------------------------------------------------- command line: both decoders, compared


@dataclass
class SpeculativeAppArgs:
    ckpt_dir: str = ""
    prompt: Optional[str] = None
    prompts: list[str] = field(default_factory=list)
    max_gen_len: int = 128
    batch_size: int = 1  # prompts decoded together (the batch accepts its rows' fewest drafts)
    n_draft: Optional[int] = None  # drafts per forward; None: n_future_head - 1
    repeats: int = 3  # timed runs of each decoder; the fastest counts
    add_bos: bool = True
    device: str = "cpu"  # auto | cpu | cuda
    dtype: str = "fp32"
    tokenizer: TokenizerOverride = field(default_factory=TokenizerOverride)


def compare(model: MTPTransformer, prompts: list[list[int]], max_gen_len: int, batch_size: int = 1,
            eos_id: Optional[int] = None, n_words: Optional[int] = None, n_draft: Optional[int] = None,
            repeats: int = 3) -> dict:
    """Greedy vs self-speculative on the same prompts: best-of-`repeats` tok/s of each (the two alternate, so both
    see the same machine load), tokens per forward, and whether the outputs are identical."""
    def run(decode, **kw):
        outputs, total = [], DecodeStats()
        for i in range(0, len(prompts), batch_size):
            rows, s = decode(model, prompts[i: i + batch_size], max_gen_len, eos_id, n_words, **kw)
            outputs += rows
            total.generated_tokens += s.generated_tokens
            total.forwards += s.forwards
            total.row_forwards += s.row_forwards
            total.seconds += s.seconds
        return outputs, total

    greedy = spec = None
    for _ in range(repeats):
        greedy_out, g = run(greedy_decode)
        spec_out, s = run(speculative_decode, n_draft=n_draft)
        greedy = g if greedy is None or g.seconds < greedy.seconds else greedy
        spec = s if spec is None or s.seconds < spec.seconds else spec
    return {"identical": greedy_out == spec_out, "greedy_tok_per_s": greedy.tok_per_s,
            "speculative_tok_per_s": spec.tok_per_s, "speedup": spec.tok_per_s / greedy.tok_per_s,
            "tokens_per_forward": spec.tokens_per_forward, "generated_tokens": spec.generated_tokens,
            "greedy_outputs": greedy_out, "speculative_outputs": spec_out}


def main(args: SpeculativeAppArgs) -> dict:
    if not args.ckpt_dir:
        raise ConfigError("ckpt_dir is required (a checkpoint or run directory of apps.mtp.train)")
    texts = ([args.prompt] if args.prompt is not None else []) + list(args.prompts)
    if not texts:
        raise ConfigError('give prompt="..." or prompts=[...]')
    if args.batch_size < 1 or args.repeats < 1 or args.max_gen_len < 1:
        raise ConfigError("batch_size, repeats and max_gen_len must be >= 1")
    setup_logging(0, level=logging.WARNING)
    model, _, tok = load_model(args.ckpt_dir, pick_device(args.device), args.dtype, args.tokenizer)
    if not isinstance(model, MTPTransformer):
        raise LinguaError(f"'{args.ckpt_dir}' holds a {type(model).__name__}, not a multi-token prediction model "
                          "(apps.mtp.train): it has no extra heads to draft with")
    prompts = [tok.encode(t, add_bos=args.add_bos, add_eos=False) for t in texts]
    r = compare(model, prompts, args.max_gen_len, args.batch_size, tok.eos_id, tok.n_words, args.n_draft,
                args.repeats)
    for text, ids in zip(texts, r["speculative_outputs"]):
        print(f"=== {text!r}\n{text}{tok.decode(ids)}")
    print(f"greedy {r['greedy_tok_per_s']:.1f} tok/s, self-speculative {r['speculative_tok_per_s']:.1f} tok/s: "
          f"x{r['speedup']:.2f} ({r['tokens_per_forward']:.2f} tokens per forward, {r['generated_tokens']} tokens, "
          f"batch_size {args.batch_size}); outputs identical: {r['identical']}", flush=True)
    if not r["identical"]:
        raise LinguaError("self-speculative output differs from greedy (numerical near-tie in fp32/bf16?)")
    return r


def cli(argv: Optional[list[str]] = None):
    """`prompt=...` is taken verbatim (not parsed as YAML), as in apps.main.generate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    raw = [a.split("=", 1)[1] for a in argv if a.startswith("prompt=")]
    rest = [a for a in argv if not a.startswith("prompt=")]

    def run(args: SpeculativeAppArgs):
        if raw:
            args.prompt = raw[-1]
        return main(args)

    return run_cli(run, SpeculativeAppArgs, rest)


if __name__ == "__main__":
    cli()
