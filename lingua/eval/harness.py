"""lm-evaluation-harness over our model and tokenizer (the optional `eval` extra: pip install -e '.[eval]').

    lm = LinguaLM(model, tokenizer, batch_size=8)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"], task_manager=TaskManager())

Every request is scored with BOS in front of its context, as training documents start. `loglikelihood` moves the
context's trailing spaces into the continuation and tokenizes context + continuation together (lm-eval's convention
for causal models), truncating the context from the left to model.max_seqlen. Requests are batched longest first and
right-padded, which a causal mask makes harmless. `generate_until` runs `lingua.eval.generate.Generator` (KV cache) per
group of identical generation settings. Under torchrun each rank scores its share of the requests and lm-eval gathers
the metrics on rank 0 through the collectives below.
"""

import json
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lingua.errors import LinguaError, require
from lingua.eval.generate import Generator, GeneratorArgs

_lm_eval_model = require("lm_eval.api.model", "eval")
_lm_eval_utils = require("lm_eval.utils", "eval")


class LinguaLM(_lm_eval_model.LM):
    def __init__(self, model, tokenizer, batch_size: int = 8, max_gen_len: int = 256, seed: int = 42):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_gen_len, self.seed = batch_size, max_gen_len, seed
        self.max_length = model.args.max_seqlen
        self._device = next(model.parameters()).device
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    # ------------------------------------------------------------ tokenization

    def _encode(self, text: str, add_bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, add_eos=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with BOS, continuation ids); an empty context is BOS alone."""
        if not context:
            return [self.tokenizer.bos_id], self._encode(continuation, add_bos=False)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:  # "Question: ... Answer: " + "yes" is scored as "... Answer:" + " yes"
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return ctx, whole[len(ctx):]

    # ------------------------------------------------------------ scoring

    @torch.no_grad()
    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): sum of log p(continuation | context), and whether greedy decoding
        would have produced the continuation."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        for k in range(0, len(order), self.batch_size):
            idx = order[k: k + self.batch_size]
            rows = []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise LinguaError("lm-eval asked to score an empty continuation")
                if len(cont) > self.max_length:
                    raise LinguaError(f"a continuation of {len(cont)} tokens exceeds "
                                      f"model.max_seqlen={self.max_length}")
                rows.append((ctx + cont)[-(self.max_length + 1):][:-1])  # the last token is only a target
            tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
            for b, row in enumerate(rows):
                tokens[b, : len(row)] = torch.tensor(row)
            logits = self.model(tokens.to(self._device))  # (bs, seqlen, vocab)
            for b, i in enumerate(idx):
                cont = torch.tensor(pairs[i][1], device=self._device)
                end = len(rows[b])
                logprobs = F.log_softmax(logits[b, end - len(cont): end].float(), dim=-1)  # (n_cont, vocab)
                total = logprobs.gather(-1, cont[:, None]).sum().item()
                results[i] = (total, bool((logprobs.argmax(-1) == cont).all()))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = self.score([self.encode_pair(*req.args) for req in requests])
        for req, res in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's full log-likelihood after BOS, in disjoint windows of model.max_seqlen predictions."""
        pairs, owner = [], []
        for n, req in enumerate(requests):
            windows = _lm_eval_utils.get_rolling_token_windows(
                token_list=self._encode(req.args[0], add_bos=False), prefix_token=self.tokenizer.bos_id,
                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(_lm_eval_utils.make_disjoint_window, windows):
                pairs.append((ctx, cont))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self.score(pairs)):
            totals[n] += logprob
        for req, res in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # requests with the same generation settings run together
        for n, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(n)
        out: list[str] = [""] * len(requests)
        for key, members in groups.items():
            kwargs = dict(json.loads(key))
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = kwargs.pop("do_sample", False)
            args = GeneratorArgs(
                temperature=float(kwargs.get("temperature", 0.0) or 0.0) if do_sample else 0.0,
                top_k=kwargs.get("top_k"), top_p=kwargs.get("top_p"),
                max_gen_len=int(kwargs.get("max_gen_toks", self.max_gen_len)),
                stop=until, seed=self.seed, batch_size=self.batch_size,
            )
            prompts = [requests[n].args[0] for n in members]
            completions, _ = Generator(self.model, self.tokenizer, args).generate(prompts)
            for n, text in zip(members, completions):
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    # ------------------------------------------------------------ collectives lm-eval uses when world_size > 1

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
