"""Plan a training run before it runs: peak memory by category, FLOPs, bytes per collective and the step time per GPU,
for N GPUs, from the app's real build and parallelization on a fake world of N ranks (nothing is allocated).

    python -m lingua.plan config=apps/main/configs/llama_7B.yaml world_size=64 gpu=h100 [key=value ...]

Plan keys: world_size (default 8), gpu (h100 | h200 | a100 | b200 | mi300x; default h100), spec (a registered
model name such as moe, or module:attr; default: the app of apps/<app>/configs/, else the transformer), suggest
(true: when it does not fit, re-plan the smallest changes that would), extrapolate (auto | true | false; auto:
a model of more than 12 blocks is simulated with 4 and 6 and extrapolated, lingua/plan/extrapolate.py), out (also
write the plan to this file).
Every other key=value is a training override, as `python -m apps.<app>.train` takes it. Exit code 0 when it fits,
3 when it does not, 2 for bad input.
"""

import sys
from importlib.metadata import entry_points
from pathlib import Path

from lingua.errors import ConfigError, exit_on_error
from lingua.models.spec import ModelSpec, get_spec

PLAN_KEYS = ("world_size", "gpu", "spec", "suggest", "extrapolate", "out")
DOES_NOT_FIT = 3


def resolve_spec(name: str, config: str | None) -> ModelSpec:
    """spec=module:attr, spec=<registered name>, or the app whose configs/ folder holds the config."""
    registered = {ep.name: ep.value for ep in entry_points(group="lingua.models")}
    if ":" in name:
        return get_spec(name)
    if name:
        if name not in registered:
            raise ConfigError(f"spec={name!r} is not a registered model ({', '.join(registered)}) nor module:attr")
        return get_spec(registered[name])
    parts = Path(config or "").parts
    app = parts[parts.index("apps") + 1] if "apps" in parts[:-1] else "main"
    return get_spec(registered.get(app, registered["transformer"]))


def split_argv(argv: list[str]) -> tuple[dict, list[str]]:
    ours, rest = {}, []
    for arg in argv:
        key, eq, value = arg.partition("=")
        (ours.__setitem__(key, value) if eq and key in PLAN_KEYS else rest.append(arg))
    return ours, rest


def world_size(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"world_size must be an integer, got {value!r}") from None


@exit_on_error
def main(argv: list[str]) -> int:
    from lingua.args import load_config
    from lingua.plan.extrapolate import parse_extrapolate
    from lingua.plan.plan import plan
    from lingua.plan.report import format_plan
    from lingua.train.loop import train_args_cls

    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        return 0
    ours, rest = split_argv(argv)
    config = next((a.split("=", 1)[1] for a in rest if a.startswith("config=")), None)
    spec = resolve_spec(ours.get("spec", ""), config)
    args = load_config(train_args_cls(spec), rest)
    p = plan(args, spec, world_size(ours.get("world_size", "8")), ours.get("gpu", "h100"),
             suggest=ours.get("suggest", "true").lower() != "false",
             extrapolate=parse_extrapolate(ours.get("extrapolate", "auto")))
    text = format_plan(p, config or "")
    print(text)
    if ours.get("out"):
        Path(ours["out"]).write_text(text + "\n")
    return 0 if p.fits else DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
