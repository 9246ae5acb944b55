"""A ModelSpec is all an entry point needs to know about an architecture: train, eval, generate, export_hf and the
benchmarks take one. A checkpoint's params.json names its spec (`model_spec`), so the same evaluation and generation
commands work for every app's checkpoints.

    from lingua.models.transformer.spec import TRANSFORMER_SPEC
    train(load_config(train_args_cls(TRANSFORMER_SPEC), argv), TRANSFORMER_SPEC)      # lingua.train.loop

An app defines its own (apps/mtp/model.py: MTP_SPEC) from its model, args dataclass and FLOPs count; the train loop,
checkpoints, data, parallelism, evaluation and generation are shared. Specs register themselves under the
`lingua.models` entry-point group (pyproject.toml), which is how checkpoints older than params.json's `model_spec`
and Hugging Face directories find theirs without lingua importing any app.
"""

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

from torch import nn

from lingua.args import DEPRECATED_KEYS, RENAMED_KEYS, upgrade_model_keys
from lingua.distributed.parallelize import parallelize_decoder
from lingua.errors import LinguaError
from lingua.hf.mapping import HFMapping, as_tuple
from lingua.models.stage import decoder_stage


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short name for logs and errors
    path: str  # "module:attribute" where this spec lives, written to params.json so checkpoints can find it again
    args_cls: type  # the model args dataclass (a DecoderArgs), the `model:` section of the config
    build: Callable[[Any], nn.Module]  # model args -> module; called on the meta device
    flops_per_token: Callable[[Any, int], float]  # (model args, seq_len) -> training FLOPs per token
    # (model, mesh, DistributedArgs, param_dtype, device) -> model: how this model is parallelized, on the meta device
    # (TP -> AC -> compile -> FSDP; EP for MoE). The default has no TP plan: tp_size > 1 is refused with one line.
    parallelize: Callable[..., nn.Module] = parallelize_decoder
    # (meta-device model, range of blocks) -> the pipeline stage that runs them (lingua/models/stage.py; embeddings
    # with the first stage, norm/output/loss with the last), sharing the model's modules and parameter names
    pipeline_stage: Callable[[nn.Module, range], nn.Module] = decoder_stage
    # Hugging Face export/import, in order of preference (export takes the first that computes the model exactly,
    # import the one for config.json's model_type); (): export is refused with one line. One mapping is accepted too.
    hf: tuple[HFMapping, ...] = ()
    describe: Optional[Callable] = None  # (model args, device, dtype, seq_len) -> text logged at start
    check_train_args: Optional[Callable[[Any], None]] = None  # (TrainArgs) -> None, or a ConfigError
    # (model) -> {name: float or scalar tensor} merged into the metrics row at log steps, called on every rank with
    # the unwrapped model (it may run collectives); e.g. the MTP app's per-head losses
    step_metrics: Optional[Callable[[nn.Module], dict]] = None
    after_optimizer_step: Optional[Callable[[nn.Module], None]] = None  # called after every optimizer step (MoE: bias update)
    # () -> a context manager lingua.plan enters around the step it runs on fake tensors, for what a step with no data
    # must assume (MoE: balanced routing sizes the expert-parallel all-to-all); it must not change a real step
    simulate_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    # (TrainArgs, world size) -> more single config changes (dicts of dotted keys) that lingua.plan re-plans when a
    # run does not fit, beside AC, TP and the micro-batch (MoE: a larger distributed.ep_size)
    plan_candidates: Optional[Callable[[Any, int], list[dict]]] = None

    def __post_init__(self):
        object.__setattr__(self, "hf", as_tuple(self.hf))


def get_spec(path: str) -> ModelSpec:
    """The ModelSpec at "module:attribute" (as params.json records it)."""
    module, _, attr = MOVED_SPECS.get(path, path).partition(":")
    try:
        spec = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise LinguaError(f"model spec '{path}' cannot be imported ({e})") from None
    if not isinstance(spec, ModelSpec):
        raise LinguaError(f"'{path}' is a {type(spec).__name__}, not a lingua ModelSpec")
    return spec


# Where specs lived when older checkpoints recorded their path (params.json's `model_spec`): old path -> new path.
MOVED_SPECS = {"lingua.spec:TRANSFORMER_SPEC": "lingua.models.transformer.spec:TRANSFORMER_SPEC"}


def builtin_specs() -> list[str]:
    """The "module:attr" of every registered spec (the `lingua.models` entry points), the transformer first:
    checkpoints written before params.json named its spec are matched against these in that order."""
    paths = [ep.value for ep in entry_points(group="lingua.models")]
    return sorted(paths, key=lambda p: (not p.startswith("lingua."), paths.index(p)))


def spec_for_params(params: dict, where) -> ModelSpec:
    """The spec a checkpoint's params.json names; for older checkpoints, the built-in spec whose args have every
    `model.*` key they saved (the transformer first)."""
    if params.get("model_spec"):
        return get_spec(params["model_spec"])
    renamed = {old.removeprefix("model."): new.removeprefix("model.") for old, new in RENAMED_KEYS.items()
               if old.startswith("model.")}
    deprecated = {k.removeprefix("model.") for k in DEPRECATED_KEYS if k.startswith("model.")}
    keys = {renamed.get(k, k) for k in params.get("model") or {}} - deprecated
    for path in builtin_specs():
        spec = get_spec(path)
        if keys <= {f.name for f in dataclasses.fields(spec.args_cls)}:
            return spec
    raise LinguaError(f"{where}: no model spec takes the model keys {sorted(keys)}; pass model_spec=<module:attr>")


def spec_for_hf(model_type: str, where) -> ModelSpec:
    """The built-in spec whose Hugging Face mapping reads config.json's `model_type`."""
    for path in builtin_specs():
        spec = get_spec(path)
        if any(model_type in m.model_types for m in spec.hf):
            return spec
    known = [t for p in builtin_specs() for m in get_spec(p).hf for t in m.model_types]
    raise LinguaError(f"{where}: Hugging Face model_type '{model_type}' is not supported (lingua reads "
                      f"{', '.join(known)})")


def model_args_from_params(params: dict, spec: ModelSpec, where):
    """The spec's args dataclass from params.json's `model` section (deprecated keys dropped or mapped, renamed ones
    renamed: lingua.args.upgrade_deprecated)."""
    known = {f.name for f in dataclasses.fields(spec.args_cls)}
    model = upgrade_model_keys(params["model"], spec.args_cls, str(where))
    unknown = sorted(set(model) - known)
    if unknown:
        raise LinguaError(f"{where}: model.{unknown[0]} is not a {spec.args_cls.__name__} field "
                          "(a checkpoint of another model?)")
    return spec.args_cls(**model)
