"""Configs: nested dataclasses are the schema; dataclass defaults < `config=file.yaml` < `key=value` on the command line.

    cfg = load_config(TrainArgs, ["config=apps/main/configs/debug.yaml", "optim.lr=1e-3"])

Every mistake is one line naming the full dotted key (with the closest valid key), the file and line, or the expected
type: `unknown key 'optim.lrr' (did you mean 'optim.lr'?)`. `run_cli` turns those into a message and exit code 2, and
answers `--help [SECTION]` with the schema's reference (lingua/config_doc.py).
"""

import dataclasses
import difflib
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lingua.config_doc import help_text
from lingua.errors import ConfigError, exit_on_error
from lingua.files import write_text_atomic

T = TypeVar("T")
logger = logging.getLogger("lingua")

# Keys older configs and checkpoints (config.yaml, params.json) carry that no longer exist, accepted with one warning
# each: old key -> (why, {old value: (new key, new value)}). A key without a mapping is dropped; a folded switch must
# be true (mapped) or false (dropped: the new key's default). A mapped value replaces the new key's in the same file:
# a config dumped before the fold holds both, and there the old switch decided.
DEPRECATED_KEYS = {
    "model.seed": ("the model is initialised from the top-level `seed`", {}),
    "optim.annealing_step": ("no schedule ever read it", {}),
    "model.zero_init_proj": ("folded into model.init_std_factor", {True: ("model.init_std_factor", "zero")}),
    # full before selective: with both true, selective won, so it is mapped last
    "distributed.activation_checkpointing": ("folded into distributed.ac", {True: ("distributed.ac", "full")}),
    "distributed.selective_activation_checkpointing": ("folded into distributed.ac",
                                                       {True: ("distributed.ac", "selective")}),
}
# Keys that moved: accepted under the old name with a warning (the new name wins where a layer gives both).
RENAMED_KEYS = {"model.cpu_attn_backward": "model.attn_backward"}


def _unwrap_optional(tp):
    """Optional[X] -> X; anything else unchanged."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _unwrap_optional(hints[f.name]) for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> list[str]:
    """Every valid dotted key of a dataclass schema, for 'did you mean' hints."""
    keys = []
    for name, tp in _field_types(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, prefix + name + ".")
    return keys


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_keys(cls, values: dict, prefix: str, root_cls) -> None:
    """Fail on the first key that the schema does not have, naming it in full with the closest valid key."""
    types = _field_types(cls)
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in types:
            close = difflib.get_close_matches(full, _all_keys(root_cls), n=1, cutoff=0.6)
            close = close or difflib.get_close_matches(str(key), list(types), n=1, cutoff=0.5)
            if close and "." not in close[0] and prefix:
                close = [prefix + close[0]]
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}")
        tp = types[key]
        if dataclasses.is_dataclass(tp):
            if isinstance(value, dict):
                _check_keys(tp, value, full + ".", root_cls)
            elif value is not None:
                raise ConfigError(f"invalid value for '{full}': expected a mapping of {tp.__name__} fields, got {type(value).__name__} {value!r}")


def _expected_type(cls, dotted: str):
    tp = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = _field_types(tp).get(part)
    return tp


def _load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file '{path}'{where}: invalid YAML ({problem})") from None
    except OSError as e:
        raise ConfigError(f"config file '{path}' cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.start}): give a YAML file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys, got {type(data).__name__}")
    return data


def _parse_dotlist(items: list[str]) -> dict:
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"expected key=value on the command line, got '{item}'")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(items))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse command line overrides: {str(e).splitlines()[0]}") from None


def _parent(layer: dict, dotted: str, create: bool = False) -> tuple[Any, str]:
    """The mapping of `layer` that holds the last part of `dotted`, and that part (None if a parent is missing)."""
    *parents, key = dotted.split(".")
    node = layer
    for p in parents:
        if create and isinstance(node, dict):
            node = node.setdefault(p, {})
        else:
            node = node.get(p) if isinstance(node, dict) else None
    return node, key


def _stale_parent(cls, layer: dict, dotted: str) -> Optional[dict]:
    """The mapping in `layer` that holds the old key `dotted`, if it does and the schema no longer has that key."""
    node, key = _parent(layer, dotted)
    return node if isinstance(node, dict) and key in node and _expected_type(cls, dotted) is None else None


def _rename_moved(cls, layer: dict, origin: str) -> None:
    for old, new in RENAMED_KEYS.items():
        node = _stale_parent(cls, layer, old)
        if node is not None:  # old and new share their parent
            node.setdefault(new.rsplit(".", 1)[-1], node.pop(old.rsplit(".", 1)[-1]))
            logger.warning(f"'{old}' in {origin} is now '{new}': read as such")


def upgrade_deprecated(cls, layer: dict, origin: str) -> None:
    """Rename the RENAMED_KEYS, then drop, or map onto the key that replaced it, each DEPRECATED_KEYS key of one
    config layer (in place) that the schema `cls` does not have, with one warning each."""
    _rename_moved(cls, layer, origin)
    for dotted, (why, mapping) in DEPRECATED_KEYS.items():
        node = _stale_parent(cls, layer, dotted)
        if node is None:
            continue
        value = node.pop(dotted.rsplit(".", 1)[-1])
        if mapping and not isinstance(value, bool):
            raise ConfigError(f"invalid value for deprecated key '{dotted}' in {origin}: expected true or false, got "
                              f"{type(value).__name__} {value!r}")
        if value in mapping:
            new_key, new_value = mapping[value]
            parent, last = _parent(layer, new_key, create=True)
            parent[last] = new_value
            logger.warning(f"deprecated key '{dotted}' in {origin}: {why}; read as {new_key}={new_value}")
        else:
            logger.warning(f"ignoring deprecated key '{dotted}' in {origin}: {why}")


def upgrade_model_keys(model: dict, args_cls: type, origin: str) -> dict:
    """A `model:` section (params.json) of a model whose args are `args_cls`, with `upgrade_deprecated` applied."""
    layer = {"model": dict(model)}
    upgrade_deprecated(dataclasses.make_dataclass("Params", [("model", args_cls)]), layer, origin)
    return layer["model"]


def _merge(cls, layers: list[tuple[str, dict]]) -> DictConfig:
    cfg = OmegaConf.structured(cls)
    for origin, layer in layers:
        upgrade_deprecated(cls, layer, origin)
        _check_keys(cls, layer, "", cls)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or "?"
            expected = _expected_type(cls, key)
            value = OmegaConf.select(OmegaConf.create(layer), key, default=None) if key != "?" else None
            want = f"expected {_type_name(expected)}, " if expected is not None else ""
            raise ConfigError(
                f"invalid value for '{key}' in {origin}: {want}got {type(value).__name__} {value!r}"
            ) from None
    return cfg


def load_config(cls: type[T], argv: list[str] | None = None) -> T:
    """Build a `cls` instance from defaults, an optional `config=path.yaml` and `key=value` overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_files = [a.split("=", 1)[1] for a in argv if a.startswith("config=")]
    overrides = [a for a in argv if not a.startswith("config=")]
    if len(config_files) > 1:
        raise ConfigError(f"config= given {len(config_files)} times; give one file")
    layers = []
    if config_files:
        layers.append((f"'{config_files[0]}'", _load_yaml(config_files[0])))
    if overrides:
        layers.append(("command line", _parse_dotlist(overrides)))
    cfg = _merge(cls, layers)
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as e:
        raise ConfigError(f"missing value for '{e.full_key}'") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config at '{getattr(e, 'full_key', '?')}': {str(e).splitlines()[0]}") from None


def config_to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the fully merged config as YAML, atomically; `load_config(cls, [f"config={path}"])` gives it back."""
    write_text_atomic(path, config_to_yaml(cfg))


HELP_FLAGS = ("--help", "-h")


def print_help_if_asked(cls, argv: list[str]) -> bool:
    """With `--help` (or -h) in argv, print the reference of the schema `cls` (lingua.config_doc), only section
    SECTION for `--help SECTION`, and return True."""
    at = next((i for i, a in enumerate(argv) if a in HELP_FLAGS), None)
    if at is None:
        return False
    section = argv[at + 1] if at + 1 < len(argv) and "=" not in argv[at + 1] else None
    print(help_text(cls, section))
    return True


def run_cli(main: Callable[[T], Any], cls: type[T], argv: list[str] | None = None) -> Any:
    """Entry point wrapper: parse the config, run `main(cfg)`, and turn user mistakes into one line + exit code;
    `--help [SECTION]` prints the config reference instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if exit_on_error(print_help_if_asked)(cls, argv):
        return None
    return exit_on_error(lambda: main(load_config(cls, argv)))()
