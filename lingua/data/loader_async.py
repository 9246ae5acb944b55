"""The loader's async mode: the rank's pipeline (lingua.data.batches.rank_batches) in a spawned child process, batches through
shared memory (a bounded ring of slots), each with the positions of the streams it advanced.

The child is pinned to one thread of compute (OMP/MKL/OpenBLAS and torch's intra-op pool): on a machine whose cores
run the training step, a loader that spread over all of them would slow the step it is meant to hide behind.
"""

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
import weakref

import numpy as np

from lingua.data.batches import make_batch, rank_batches
from lingua.errors import LinguaError

SLOTS = 4  # groups of batches produced ahead of the trainer
GROUP = 32  # batches per group at most
GROUP_SECONDS = 0.02  # a slow loader hands over a partial group after this long
SLOT_BYTES = 4 << 20  # a group holds at most this many bytes (and at least one batch)
ONE_THREAD = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class Slots:
    """Shared memory holding SLOTS groups of compact batches: rows [slot, group, B, S + n_views - 1] and tok_idx
    [slot, group, B, S], int32. Batches cross without pickling or pipe copies (the queue carries slot numbers and
    stream positions); the trainer's side makes the int64 batches of a group at once, then hands the slot back."""

    def __init__(self, shm, layout: tuple):
        n_slots, group, batch, row_len, seq_len = layout
        self.rows = np.ndarray((n_slots, group, batch, row_len), dtype=np.int32, buffer=shm.buf)
        self.tok_idx = np.ndarray((n_slots, group, batch, seq_len), dtype=np.int32, buffer=shm.buf,
                                  offset=self.rows.nbytes)

    @staticmethod
    def layout(args) -> tuple:
        row_len = args.seq_len + args.n_views - 1
        batch_bytes = 4 * args.batch_size * (row_len + args.seq_len)
        group = max(1, min(GROUP, SLOT_BYTES // batch_bytes))
        return SLOTS, group, args.batch_size, row_len, args.seq_len

    @staticmethod
    def nbytes(layout: tuple) -> int:
        n_slots, group, batch, row_len, seq_len = layout
        return 4 * n_slots * group * batch * (row_len + seq_len)


def _worker(plan, states: dict, out, free, stop, shm_name: str, layout: tuple) -> None:
    """Run the pipeline in this child process until told to stop or the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    if "torch" in sys.modules:  # imported by the parent's main module, which spawn re-imports
        sys.modules["torch"].set_num_threads(1)
    try:  # below the trainer's threads: on a machine with no spare core the batches wait, not the step
        os.nice(10)
    except OSError:
        pass
    parent = mp.parent_process()

    def alive() -> bool:
        return not stop.is_set() and (parent is None or parent.is_alive())

    def put(item) -> bool:
        while alive():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                pass
        return False

    def take_slot():
        while alive():
            try:
                return free.get(timeout=0.2)
            except queue.Empty:
                pass
        return None

    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(name=shm_name)  # spawned children share the parent's resource tracker
    slots = Slots(shm, layout)
    try:
        k, group, started = take_slot(), [], 0.0
        for rows, tok_idx, after in rank_batches(plan, states) if k is not None else ():
            if not group:
                started = time.monotonic()
            slots.rows[k, len(group)], slots.tok_idx[k, len(group)] = rows, tok_idx
            group.append(after)
            if len(group) == layout[1] or time.monotonic() - started > GROUP_SECONDS:
                if not put(("batches", (k, group))):
                    break
                k, group = take_slot(), []
                if k is None:
                    break
    except LinguaError as e:
        put(("error", str(e)))  # flushed before exit: the queue's feeder thread is joined
    except BaseException:
        put(("crash", traceback.format_exc()))
    finally:
        del slots
        shm.close()
    if not alive():
        out.cancel_join_thread()  # nobody will read what is left: never block exit on it


def _stop_worker(proc, stop, queues, shm) -> None:
    """Stop the child without reading from the queue: a child that exits mid-write (it cancels its feeder thread once
    `stop` is set) can leave half a message in the pipe, and a `get` on that would block forever."""
    stop.set()
    proc.join(timeout=3)  # the child checks `stop` at least every 0.2 s while it waits
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=2)
    if proc.is_alive():
        proc.kill()
        proc.join()
    for q in queues:
        q.close()
        q.cancel_join_thread()
    try:
        shm.close()
    except BufferError:  # a view of it is still alive somewhere: the mapping goes with the process
        pass
    shm.unlink()


def _spawn(ctx, target, args, name: str):
    """Start a process whose environment asks every BLAS/OpenMP runtime for one thread (spawn copies os.environ)."""
    saved = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update({k: "1" for k in ONE_THREAD})
    try:
        proc = ctx.Process(target=target, args=args, daemon=True, name=name)
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return proc


class AsyncPipeline:
    """Iterator of (batch, position after) like the loader's sync pipeline, produced by a child process."""

    def __init__(self, plan, states: dict):
        from multiprocessing import shared_memory

        ctx = mp.get_context("spawn")  # fork is unsafe once torch has started threads
        layout = Slots.layout(plan.args)
        shm = shared_memory.SharedMemory(create=True, size=Slots.nbytes(layout))
        self.slots, self.seq_len, self.n_views = Slots(shm, layout), plan.args.seq_len, plan.args.n_views
        self.queue, self.free, self.stop = ctx.Queue(maxsize=SLOTS + 1), ctx.Queue(), ctx.Event()
        for k in range(SLOTS):
            self.free.put(k)
        self.proc = _spawn(ctx, _worker, (plan, states, self.queue, self.free, self.stop, shm.name, layout),
                           f"lingua-data-rank{plan.dp_rank}")
        self._finalize = weakref.finalize(self, _stop_worker, self.proc, self.stop, (self.queue, self.free), shm)
        self.batches, self._ready = 0, []

    def __next__(self):
        if not self._ready:
            kind, payload = self._receive()
            if kind != "batches":
                self.close()
                if kind == "error":
                    raise LinguaError(payload)
                raise RuntimeError(f"the data loader process failed:\n{payload}")
            k, after = payload
            n = len(after)
            # one int64 conversion (a copy) for the whole group, then the slot goes back to the child
            group = make_batch(self.slots.rows[k, :n], self.slots.tok_idx[k, :n], self.seq_len, self.n_views)
            self.free.put(k)
            self._ready = [({key: v[g] for key, v in group.items()}, after[g]) for g in reversed(range(n))]
        self.batches += 1
        return self._ready.pop()

    def _receive(self):
        while True:
            try:
                return self.queue.get(timeout=1.0)
            except queue.Empty:
                if not self.proc.is_alive():
                    try:  # it may have put its last message just before exiting
                        return self.queue.get(timeout=0.5)
                    except queue.Empty:
                        pass
                    hint = "" if self.batches else (
                        "; with data.load_async=true the main script must run under `if __name__ == '__main__':`")
                    raise LinguaError(f"the data loader process exited unexpectedly (exit code "
                                      f"{self.proc.exitcode}){hint}")

    def close(self) -> None:
        self.slots = self._ready = None  # no view of the shared memory may outlive it
        self._finalize()
