"""Several training runs in one torchrun job (process starts are the expensive part of a distributed test on CPU):

    torchrun --nproc_per_node 2 -m tests.pipeline_runs RUNS.json

RUNS.json: a list of {"spec": "module:attr", "overrides": [key=value, ...]} (each is `lingua.train.loop.train`) or
{"cut": [src, dst, step]} (tests.conftest.cut_at, on rank 0), run in order on one process group (the loop's teardown
is deferred to the end of the job).
"""

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    import torch.distributed as dist

    from lingua.args import load_config
    from lingua.distributed.mesh import DistState
    from lingua.models.spec import get_spec
    from lingua.train.loop import train, train_args_cls
    from tests.conftest import cut_at

    close = DistState.close
    DistState.close = lambda self: None  # one process group for every run of the job
    try:
        for run in json.loads(open(path).read()):
            if "cut" in run:
                if dist.get_rank() == 0:
                    src, dst, step = run["cut"]
                    cut_at(Path(src), Path(dst), step)
            else:
                spec = get_spec(run["spec"])
                train(load_config(train_args_cls(spec), run["overrides"]), spec)
            dist.barrier()
    finally:
        DistState.close = close
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
