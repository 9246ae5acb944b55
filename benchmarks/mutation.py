"""Mutation testing by hand: does the test suite notice a plausible one-line bug in the code its guarantees rest on?

    python benchmarks/mutation.py               # every mutation: fast tests, then slow ones for the survivors
    python benchmarks/mutation.py --fast-only   # skip the slow tests (a survivor of the fast ones is "survived")
    python benchmarks/mutation.py --only rope_sign --only lock_shared
    python benchmarks/mutation.py --list

Each mutation is (name, file, exact snippet, replacement, fast tests, slow tests). It is applied to a throwaway copy
of the tree (the tracked files, with data/ and tokenizers/ linked), never to the working tree. The snippet must occur
exactly once: in its file, or, if the file moved or no longer holds it, in exactly one file of lingua/ or apps/. A
snippet found nowhere is STALE (the code changed: rewrite the mutation), never counted as killed.

A mutation is killed when a test fails (pytest's exit status 1) that passes on the unmutated copy (checked once per
selection of tests; otherwise it is BROKEN, not killed); an exit status that is not a test failure (a usage error,
no test collected by any entry of the fast list) is an ERROR, so that a renamed test cannot pass for a kill.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    snippet: str
    replacement: str
    fast: tuple = ()  # pytest node ids or "path -k expr"; run with -m "not slow"
    slow: tuple = ()  # run with -m slow only if the fast ones did not kill it


def M(name, file, snippet, replacement, fast=(), slow=()):
    return Mutation(name, file, snippet, replacement, tuple(fast), tuple(slow))


OPT, T = "lingua/train/optim.py", "tests/"
MUTATIONS = [
    # ---- lr schedules
    M("linear_swapped", OPT, "return s * min_ratio + (1 - s)", "return s + (1 - s) * min_ratio",
      [T + "test_optim.py::test_linear_closed_form"]),
    M("inv_sqrt_off_by_one", OPT, "(max(warmup, 1) / max(step, 1)) ** exp_factor",
      "(max(warmup, 1) / max(step + 1, 1)) ** exp_factor", [T + "test_optim.py::test_inv_sqrt_closed_form"]),
    M("inv_sqrt_no_floor", OPT, "** exp_factor, min_ratio)", "** exp_factor, 0.0)",
      [T + "test_optim.py -k inv_sqrt or floor"]),
    M("cosine_cycle_times", OPT, "s**theta / cycle_length", "s**theta * cycle_length",
      [T + "test_optim.py -k cosine"]),
    M("cosine_theta_ignored", OPT, "math.pi * s**theta / cycle_length", "math.pi * s / cycle_length",
      [T + "test_optim.py -k cosine"]),
    M("cosine_warmup_off_by_one", OPT,
      "theta: float, min_ratio: float) -> float:\n    if step < warmup:\n        return step / warmup",
      "theta: float, min_ratio: float) -> float:\n    if step < warmup:\n        return (step + 1) / warmup",
      [T + "test_optim.py -k cosine or floor or lambda"]),
    M("wsd_decay_formula", OPT, "return 1 / (p / min_ratio + (1 - p))", "return 1 / (p * min_ratio + (1 - p))",
      [T + "test_optim.py -k wsd"]),
    M("wsd_decay_starts_late", OPT, "if step <= decay_start:", "if step <= decay_start + 1:",
      [T + "test_optim.py -k wsd"]),
    # ---- clipping
    M("clip_skipped", OPT, "torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)", "pass",
      [T + "test_optim.py -k clip"]),
    M("clip_norm_per_group_sum", OPT,
      "torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)",
      "sum(n.to(device) for n in norms)", [T + "test_optim.py -k clip"]),
    # ---- grad accumulation, loss averaging
    M("grad_acc_unscaled", "lingua/train/step.py", "(loss / args.grad_acc_steps).backward()", "loss.backward()",
      [T + "test_train.py::test_grad_accumulation_matches_one_big_batch"]),
    M("loss_mean_over_ranks", "lingua/train/step.py",
      "loss_sum * dist_state.pp_size / (args.grad_acc_steps * dist_state.world_size)",
      "loss_sum * dist_state.pp_size / args.grad_acc_steps", [T + "test_distributed.py -k two_processes_match_one"]),
    # ---- pipeline and context parallelism
    M("pp_loss_not_per_pipeline", "lingua/train/step.py",
      "loss_sum * dist_state.pp_size / (args.grad_acc_steps * dist_state.world_size)",
      "loss_sum / (args.grad_acc_steps * dist_state.world_size)", [], [T + "test_pipeline.py -k schedule_matches"]),
    M("pp_uneven_split_last_stage", "lingua/distributed/pipeline.py", "(s < n_layers % n_stages)",
      "(s >= n_stages - n_layers % n_stages)", [T + "test_pipeline.py -k split_rule"]),
    M("pp_v_schedule_stage_ids", "lingua/distributed/pipeline.py", "return [pp_rank, 2 * pp - 1 - pp_rank]",
      "return [pp_rank, pp + pp_rank]", [T + "test_pipeline.py -k split_rule"]),
    M("ring_merge_keeps_old_weight", "lingua/kernels/attention/ring.py",
      "keep = torch.exp(lse[..., qs] - new).nan_to_num_(0.0)", "keep = torch.ones_like(new)",
      [T + "test_context_parallel.py -k ring_math"]),
    M("ring_chunks_not_zigzag", "lingua/kernels/attention/ring.py", "return rank, 2 * cp - 1 - rank",
      "return 2 * rank, 2 * rank + 1", [T + "test_context_parallel.py -k ring_math or equal_share"],
      [T + "test_context_parallel.py -k block_causal_across"]),
    # ---- fused loss
    M("fused_loss_counts_ignored", "lingua/kernels/loss.py", "count = (target != IGNORE_INDEX).sum().clamp(min=1)",
      "count = torch.tensor(target.numel(), device=h.device)",
      [T + "test_transformer.py -k fused_loss_equals"]),
    M("fused_loss_grad_sign", "lingua/kernels/loss.py", "grad.scatter_add_(1, safe, -valid.to(grad.dtype))",
      "grad.scatter_add_(1, safe, valid.to(grad.dtype))", [T + "test_transformer.py -k fused_loss_equals"]),
    M("fused_loss_last_chunk_grad_w", "lingua/kernels/loss.py", "grad_w = grad_w + (grad.t() @ hc).float()",
      "grad_w = (grad.t() @ hc).float()", [T + "test_transformer.py -k fused_loss_equals"]),
    M("fused_loss_softcap_grad", "lingua/kernels/loss.py", "grad.mul_(1 - capped * capped)", "grad.mul_(1 - capped)",
      [T + "test_transformer.py -k fused_loss_equals"]),
    # ---- RoPE
    M("rope_sign", "lingua/models/transformer/model.py", "x1 * cos - x2 * sin, x1 * sin + x2 * cos",
      "x1 * cos + x2 * sin, x1 * sin + x2 * cos", [T + "test_transformer.py -k rope"]),
    M("rope_frequency_exponent", "lingua/models/transformer/model.py",
      "dtype=torch.float32) / head_dim)", "dtype=torch.float32) / (head_dim // 2))",
      [T + "test_transformer.py -k rope", T + "test_hf.py -k matches_in_transformers"]),
    # ---- CPU attention backward
    M("cpu_attn_ds_unscaled", "lingua/kernels/attention/cpu_matmul_backward.py", "ds = (p * (dp - delta) * scale)",
      "ds = (p * (dp - delta))", [T + "test_cpu_attention.py::test_gradients_match_float64_autograd"]),
    M("cpu_attn_dk_overwritten", "lingua/kernels/attention/cpu_matmul_backward.py", "dk[..., :end, :] += bk",
      "dk[..., :end, :] = bk",
      [T + "test_cpu_attention.py::test_gradients_match_float64_autograd"]),
    M("cpu_attn_mask_ignored", "lingua/kernels/attention/cpu_matmul_backward.py",
      "allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril() if mask is None else mask",
      "allowed = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()",
      [T + "test_cpu_attention.py::test_gradients_match_float64_autograd"]),
    # ---- checksums
    M("integrity_compare_skipped", "lingua/checkpoint/integrity.py", "if file_sha256(p) != sums[name]:",
      "if False:", [T + "test_ckpt_integrity.py", T + "test_train.py::test_corrupt_checkpoint_is_a_clear_error"]),
    M("integrity_missing_ok", "lingua/checkpoint/integrity.py",
      "        if not p.is_file():\n            return f\"{p} is missing\"",
      "        if not p.is_file():\n            continue", [T + "test_ckpt_integrity.py"]),
    M("integrity_rank0_files_unhashed", "lingua/checkpoint/integrity.py",
      "for name in (\"params.json\", \"kinds.json\"):",
      "for name in ():", [T + "test_ckpt_integrity.py"]),
    M("integrity_only_rank0_verdict", "lingua/checkpoint/integrity.py",
      "bad = next((v for v in verdicts if v), None)", "bad = verdicts[0]",
      [T + "test_ckpt_integrity.py -k only_another_rank"]),
    # ---- the run lock
    M("lock_shared", "lingua/checkpoint/lock.py", "fcntl.LOCK_EX | fcntl.LOCK_NB", "fcntl.LOCK_SH | fcntl.LOCK_NB",
      [T + "test_run_lock.py"]),
    # ---- async saves
    M("async_no_wait_before_save", "lingua/checkpoint/manager.py", "self.wait()  # at most one save in flight",
      "pass", [T + "test_async_checkpoint.py -k second_async"], [T + "test_async_checkpoint.py"]),
    # ---- exact resume: RNG, scheduler, checkpoint load
    M("rng_not_restored", "lingua/train/loop.py", "            set_rng_state(mine[\"rng\"])", "            pass",
      [T + "test_train.py -k restores_the_rng"], [T + "test_train.py -k preemption"]),
    M("scheduler_not_restored", "lingua/train/loop.py", "self.scheduler.load_state_dict(mine[\"scheduler\"])",
      "pass", [T + "test_train.py -k restores_the_rng or resume_is_bit_identical"]),
    # ---- data: streams, loader state, world-size invariance
    M("stream_doc_stride", "lingua/data/streams.py", "doc += n_streams", "doc += 1",
      [T + "test_data.py -k every_token_once"]),
    M("mix_draws_ignore_stream", "lingua/data/streams.py", "default_rng([seed, 0, stream, block_id])",
      "default_rng([seed, 0, block_id])",
      [T + "test_data.py -k source_weights or every_token_once or own_source_order"]),
    M("rows_yielded_ignores_next", "lingua/data/streams.py", "return state[\"fill\"] * prefetch_size + state[\"next\"]",
      "return state[\"fill\"] * prefetch_size", [T + "test_data.py -k between_the_micro or resume"]),
    M("group_after_repeats_row", "lingua/data/batches.py", "(self.streams, number, j + 1, self.starts)",
      "(self.streams, number, j, self.starts)", [T + "test_data.py -k exact_resume"]),
    M("plan_cycle_rank_offset", "lingua/data/batches.py", "q * rows + self.dp_rank * b + i",
      "q * rows + self.dp_rank + i",
      [T + "test_data.py -k global_batch_is_the_same"]),
    M("restore_total_rows", "lingua/data/loader.py", "// a.batch_size * rows  # global rows consumed",
      "// a.batch_size * a.batch_size  # global rows consumed", [T + "test_data.py -k another_layout"]),
    M("restore_takes_first_rank_only", "lingua/data/loader.py",
      "merged = {int(k): v for s in states for k, v in s[\"streams\"].items()}",
      "merged = {int(k): v for k, v in states[0][\"streams\"].items()}",
      [T + "test_data.py -k another_layout or only_this_ranks"]),
    # ---- bits per byte, multi-rank eval
    M("bpb_in_nats", "lingua/eval/bpb.py", "nll / math.log(2) / n_bytes", "nll / n_bytes",
      [T + "test_eval_bpb.py", T + "test_eval_app.py"]),
    M("eval_rounds_floor", "lingua/eval/bpb.py", "rounds = math.ceil(len(batches) / dist_state.dp_size)",
      "rounds = len(batches) // dist_state.dp_size", [T + "test_eval_bpb.py"]),
    M("eval_padding_counted", "lingua/eval/bpb.py", "if i < len(batches):", "if True:", [T + "test_eval_bpb.py"]),
    # ---- sampling
    M("temperature_multiplies", "lingua/eval/generate.py", "logits = logits.float() / temperature",
      "logits = logits.float() * temperature", [T + "test_generate.py"]),
    M("top_k_off_by_one", "lingua/eval/generate.py", "values[:, -1:]", "values[:, -2:-1]", [T + "test_generate.py"]),
    M("top_p_includes_boundary", "lingua/eval/generate.py", "probs.cumsum(-1) - probs >= top_p",
      "probs.cumsum(-1) >= top_p", [T + "test_generate.py"]),
    M("generate_one_token_short", "lingua/eval/generate.py", "for cur in range(longest, longest + max_gen_len):",
      "for cur in range(longest, longest + max_gen_len - 1):",
      [T + "test_mtp.py -k generate_app", T + "test_mamba.py -k generate_app"]),
    # ---- plan vs measured: what the counter counts, what the time model makes of it
    M("plan_allgather_counts_the_shard", "lingua/plan/comm.py", "\"_allgather_base_\": (\"all_gather\", 0)",
      "\"_allgather_base_\": (\"all_gather\", 1)", [T + "test_plan.py -k counted"],
      [T + "test_plan.py -k two_gloo"]),
    M("plan_allreduce_one_pass", "lingua/plan/estimate.py", "(2 if kind == \"all_reduce\" else 1)", "1",
      [T + "test_plan.py -k ring_factor"]),
    M("plan_tp_comm_overlapped", "lingua/plan/estimate.py", "(len(tp_ranks) > 1 and ranks == tp_ranks)", "False",
      [T + "test_plan.py -k ring_factor"], [T + "test_plan.py -k replans"]),
    # ---- stool: the job runs the config given plus the overrides
    M("stool_overrides_dropped", "lingua/tools/stool.py", "OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))",
      "OmegaConf.merge(cfg, OmegaConf.from_dotlist([]))",
      [T + "test_stool.py", T + "test_slurm_cluster.py -k writes_where"]),
    # ---- Muon
    M("muon_ns_coefficient", "lingua/train/muon.py", "(3.4445, -4.7750, 2.0315)", "(3.4445, -4.7750, 2.315)",
      [T + "test_muon.py -k matches_torch"]),
    M("muon_momentum_swapped", "lingua/train/muon.py", "buf.lerp_(p.grad, 1 - g[\"momentum\"])",
      "buf.lerp_(p.grad, g[\"momentum\"])", [T + "test_muon.py -k matches_torch"]),
    M("muon_no_nesterov", "lingua/train/muon.py", "p.grad.lerp(buf, g[\"momentum\"]) if g[\"nesterov\"] else buf",
      "buf", [T + "test_muon.py -k matches_torch"]),
    # ---- MoE aux loss
    M("moe_aux_unscaled", "apps/moe/model.py", "aux = self.args.n_experts * (counts.float()", "aux = (counts.float()",
      [T + "test_moe.py -k switch_loss or aux_losses"]),
    M("moe_z_uses_aux_coef", "apps/moe/model.py", "+ self.args.z_loss_coef * z", "+ self.args.aux_loss_coef * z",
      [T + "test_moe.py -k switch_loss or aux_losses"]),
    M("moe_aux_metric_last_layer", "apps/moe/model.py", "\"moe/aux_loss\": sum(aux) / len(aux)",
      "\"moe/aux_loss\": aux[-1]", [T + "test_moe.py -k trains_through"]),
    # ---- HF mapping: the RoPE permutation
    M("hf_permutation_inverse", "lingua/models/transformer/hf.py",
      "w.reshape(n_heads, head_dim // 2, 2, dim).transpose(1, 2)",
      "w.reshape(n_heads, 2, head_dim // 2, dim).transpose(1, 2)",
      [T + "test_hf.py -k rope_permutation or matches_in_transformers"]),
    M("hf_wk_uses_query_heads", "lingua/models/transformer/hf.py", "\"attention.wk.weight\": n_kv_heads",
      "\"attention.wk.weight\": n_heads", [T + "test_hf.py -k matches_in_transformers or round_trips"]),
]


def tracked_copy(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / name.decode()
        if src.is_file():  # a file deleted in the working tree but not yet in git's index is skipped
            (dst / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name.decode())
    for link in ("data", "tokenizers"):
        if (ROOT / link).exists():
            (dst / link).symlink_to((ROOT / link).resolve())


def locate(tree: Path, m: Mutation):
    """The file of `tree` holding m.snippet exactly once: m.file, else the one file of lingua/ or apps/ that does."""
    own = tree / m.file
    if own.is_file() and own.read_text().count(m.snippet) == 1:
        return own
    hits = [p for d in ("lingua", "apps") for p in sorted((tree / d).rglob("*.py"))
            if p.read_text().count(m.snippet) == 1]
    return hits[0] if len(hits) == 1 else None


def pytest(tree: Path, tests: tuple, marker: str) -> int:
    """pytest's exit status over `tests` (each "path[::name]" or "path -k expr"), stopping at the first failure;
    5 (pytest's "no tests collected") when none of them selected a test."""
    collected = False
    for t in tests:
        path, _, k = t.partition(" -k ")
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", marker, path]
        if k:
            cmd += ["-k", k]
        rc = subprocess.run(cmd, cwd=tree, capture_output=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
                                                                      "OMP_NUM_THREADS": "1"}).returncode
        if rc == 5:  # nothing of this entry on this marker: fine as long as another entry ran tests
            continue
        collected = True
        if rc != 0:
            return rc
    return 0 if collected or not tests else 5


_CLEAN: dict = {}  # (tests, marker) -> pytest's exit status on the unmutated tree


def clean_rc(tree: Path, tests: tuple, marker: str) -> int:
    """A kill counts only if the same tests pass without the mutation (a test broken on its own kills nothing)."""
    if (tests, marker) not in _CLEAN:
        _CLEAN[tests, marker] = pytest(tree, tests, marker)
    return _CLEAN[tests, marker]


def run_one(tree: Path, m: Mutation, fast_only: bool) -> str:
    path = locate(tree, m)
    if path is None:
        return "STALE"
    original = path.read_text()

    def verdict(tests: tuple, marker: str, killed: str):
        path.write_text(original.replace(m.snippet, m.replacement))
        try:
            rc = pytest(tree, tests, marker)
        finally:
            path.write_text(original)
        if rc == 1:
            return killed if clean_rc(tree, tests, marker) in (0, 5) else "BROKEN (the tests fail without it)"
        return None if rc == 0 or (rc == 5 and marker == "slow") else f"ERROR (pytest exit {rc})"

    out = verdict(m.fast, "not slow", "killed (fast)")
    if out is None and not fast_only and m.slow:
        out = verdict(m.slow, "slow", "killed (slow)")
    return out or "SURVIVED"


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run this mutation (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the mutations and whether their snippet is found")
    ap.add_argument("--fast-only", action="store_true", help="skip the slow tests")
    args = ap.parse_args(argv)
    unknown = set(args.only) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutation(s): {', '.join(sorted(unknown))}")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in chosen:
            where = locate(ROOT, m)
            print(f"{m.name:32} {where.relative_to(ROOT) if where else 'STALE (' + m.file + ')'}")
        return 0
    t0, results = time.time(), []
    with tempfile.TemporaryDirectory(prefix="lingua-mutation-") as tmp:
        tree = Path(tmp)
        tracked_copy(tree)
        for m in chosen:
            t = time.time()
            outcome = run_one(tree, m, args.fast_only)
            results.append((m, outcome, time.time() - t))
            print(f"{m.name:32} {outcome:18} {time.time() - t:6.0f} s  {m.file}", flush=True)
    counted = [o for _, o, _ in results if o.startswith(("killed", "SURVIVED"))]
    killed = sum(o.startswith("killed") for o in counted)
    print("\n| mutation | file | outcome |\n|---|---|---|")
    for m, o, _ in results:
        print(f"| {m.name} | {m.file} | {o} |")
    print(f"\nkilled {killed}/{len(counted)} ({100 * killed / max(1, len(counted)):.0f}%), "
          f"{sum(o == 'STALE' for _, o, _ in results)} stale, {sum(o.startswith('ERROR') for _, o, _ in results)} "
          f"errors, {sum(o.startswith('BROKEN') for _, o, _ in results)} broken; {time.time() - t0:.0f} s on {cpu_name()}{' (fast tests only)' if args.fast_only else ''}")
    return 0 if killed == len(counted) and len(counted) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
