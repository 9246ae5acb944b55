"""Training: THE loop every app shares (loop.py), optimizers and schedules (optim.py, muon.py), metrics, startup
checks, profiling and probes."""
