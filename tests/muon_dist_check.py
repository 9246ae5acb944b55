"""Run under torchrun (2 or 4 processes, gloo) by tests/test_muon.py: lingua.train.muon.orthogonalize_all on DTensors of
several layouts equals the single-process orthogonalization, each matrix is orthogonalized on one rank only, and
the bytes this rank sends in collectives are counted (a dispatch mode over the c10d ops: a gather's non-root ranks
send their input, a scatter's root sends every piece but its own; any other collective is named).
Prints one JSON line per rank: {"rank", "max_err", "computed", "total", "sent", "other_ops", "sharded_bytes",
"replicated_bytes"} (the full matrices' bytes of the sharded and the replicated layouts)."""

import json

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import lingua.train.muon as muon


class SentBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sent, self.other = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if func.namespace in ("c10d", "_c10d_functional"):
            me, root = dist.get_rank(), args[3] if len(args) > 3 else None
            if name == "gather_" and me != root:
                self.sent += sum(t.nbytes for t in args[1])
            elif name == "scatter_" and me == root:
                pieces = args[1][0]
                self.sent += sum(t.nbytes for t in pieces) - pieces[me].nbytes
            elif name not in ("gather_", "scatter_"):
                self.other.add(name)
        return func(*args, **(kwargs or {}))


def _replicated(d) -> bool:
    return all(p.is_replicate() for p in d.placements)


def main() -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    torch.manual_seed(0)
    shapes = [(256, 32), (32, 256), (32, 32), (7, 5)]  # tall, wide, square, uneven shards
    mesh = init_device_mesh("cpu", (world,))
    layouts = [(mesh, [Shard(0)]), (mesh, [Shard(1)]), (mesh, [Replicate()])]
    if world == 4:  # FSDP x TP: dp shards rows, tp shards rows (colwise) or columns (rowwise)
        mesh2 = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        layouts += [(mesh2, [Shard(0), Shard(0)]), (mesh2, [Shard(0), Shard(1)])]
    fulls = [torch.randn(s) for _ in layouts for s in shapes]
    dts = [distribute_tensor(fulls[i * len(shapes) + j], m, p) for i, (m, p) in enumerate(layouts)
           for j in range(len(shapes))]
    computed = []
    plain = muon.orthogonalize

    def counting(g, steps, eps=1e-7):
        computed.append(tuple(g.shape))
        return plain(g, steps, eps)

    refs = [plain(f, 5) for f in fulls]
    muon.orthogonalize = counting
    with SentBytes() as comm:
        out = muon.orthogonalize_all(dts, 5)
    err = max((o.full_tensor() - r).abs().max().item() for o, r in zip(out, refs))
    print(json.dumps({"rank": dist.get_rank(), "max_err": err, "computed": len(computed), "total": len(dts),
                      "sent": comm.sent, "other_ops": sorted(comm.other),
                      "sharded_bytes": sum(f.nbytes for f, d in zip(fulls, dts) if not _replicated(d)),
                      "replicated_bytes": sum(f.nbytes for f, d in zip(fulls, dts) if _replicated(d))}),
          flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
