"""Distributed training: launcher detection and the device mesh (mesh.py), the generic parallelisms applied from
outside a model (parallelize.py: float8, AC, compile, FSDP2/HSDP/DDP), dtypes and autocast (precision.py)."""
