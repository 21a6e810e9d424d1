"""Composing and validating the Hydra config of `python -m fasttd3_lora.train` (docs/training.md).

The groups live in `configs/` (installed as `fasttd3_lora.configs`). Everything here fails with a `ConfigError`
whose message is one line naming the key, the value and what is allowed, so the app can print it and exit 2
before any work starts. Hydra's own errors are multi-line; the group choices and key names of the overrides are
therefore checked here first, against the config directory, with close matches.
"""

from __future__ import annotations

import copy
import difflib
import importlib.resources
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fasttd3_lora.checks import MISSING, ConfigError, boolean, choice, get, int_in, number_in, positive
from fasttd3_lora.algo_config import OPTIONAL_GROUPS
from fasttd3_lora.algorithms import ALGORITHMS
from fasttd3_lora.envs import TASK_FAMILIES
from fasttd3_lora.fasttd3 import FAMILY_KEYS
from fasttd3_lora.networks import CRITIC_KINDS
from fasttd3_lora.precision import PRECISIONS
from fasttd3_lora.threads import AUTO

__all__ = [
    "CONFIG_MODULE",
    "RESUME_MAY_CHANGE",
    "ConfigError",
    "config_dir",
    "group_options",
    "check_overrides",
    "compose_config",
    "validate_config",
    "merge_overrides",
    "override_value",
    "drop_override",
    "check_resume_compatible",
    "upgrade_saved",
    "RESUME_KEEPS",
    "check_device",
    "path_safe",
    "run_tag",
    "expand_shorthands",
    "drop_unused_groups",
]

CONFIG_MODULE = "fasttd3_lora.configs"
CONFIG_NAME = "config"
LOGGERS = ("none", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
# Top-level keys a resumed run may change: they steer the run, not what is learnt (docs/training.md, "Resume").
RESUME_MAY_CHANGE = (
    "total_env_steps", "eval_every", "eval_episodes", "checkpoint_every", "save_buffer",
    "keep_eval_checkpoints", "resume", "logger", "wandb", "video", "device", "threads", "precision",
    "algo.compile", "algo.compile_mode",  # how the same math is executed, not what it computes
    "algo.eval_every", "algo.checkpoint_every",  # an algorithm's cadence defaults (the top-level keys read them)
)  # fmt: skip
_LIST_AT_MOST = 12  # a group with more options than this is answered with close matches only


def path_safe(text: str) -> str:
    """`dmc/cheetah-run` -> `dmc-cheetah-run`: a config value as one path component (run directory names)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")


def budget(steps_per_env: int | None, num_envs: int, default: int) -> int:
    """The default `total_env_steps`: a task's budget per env times the envs, or `default` for tasks without one."""
    return default if steps_per_env is None else int(steps_per_env) * int(num_envs)


def drop_unused_groups(cfg: DictConfig) -> DictConfig:
    """`cfg` without the optional groups its algorithm does not use (`AlgorithmConfig.groups`: PPO has no `critic`
    or `scale`, SAC no `library` or `policy`, ...), so config.yaml and checkpoints record only what shaped the run;
    in place."""
    entry = ALGORITHMS.get(OmegaConf.select(cfg, "algo.name"))
    if entry is None:
        return cfg
    with open_dict(cfg):
        for key in OPTIONAL_GROUPS:
            if key not in entry.config.groups:
                cfg.pop(key, None)
    return cfg


def run_tag(algo: str, critic: str, library_path: str | None, library_rank: Any, policy_mode: str | None = None) -> str:
    """What a run directory's name says of the learner: the critic kind for the algorithms with the `critic/`
    group (`..._lora_s0`), else the algorithm, with the library's adapter rank (`..._ppo-lora-r4_s0`) or `full`, or
    the multi-agent policy mode (`..._mappo-lorasa_s0`)."""
    entry = ALGORITHMS.get(algo)
    if entry is None or "critic" in entry.config.groups:
        return str(critic)
    if "policy" in entry.config.groups and policy_mode is not None:
        return f"{algo}-{policy_mode}"
    if "library" not in entry.config.groups or library_path is None:
        return str(algo)
    return f"{algo}-full" if str(library_rank) == "full" else f"{algo}-lora-r{library_rank}"


SHORTHANDS = (("library=", "library.path="), ("grpo.from=", "algo.from_run="), ("grpo.", "algo."))


def expand_shorthands(overrides: Sequence[str]) -> list[str]:
    """The command lines the docs write, in config keys: `library=DIR` is `library.path=DIR`, `grpo.from=RUN` is
    `algo.from_run=RUN` and `grpo.<key>=` is `algo.<key>=` (group-relative fine-tuning's knobs)."""
    expanded = []
    for override in overrides:
        for short, full in SHORTHANDS:
            if override.startswith(short):
                override = full + override[len(short):]
                break
        expanded.append(override)
    return expanded


# configs/config.yaml uses them (the run-directory template, the default budget); registered once, at import.
for _name, _resolver in (("path_safe", path_safe), ("budget", budget), ("run_tag", run_tag)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)


def config_dir() -> Path:
    """The directory of the installed config groups."""
    return Path(str(importlib.resources.files(CONFIG_MODULE)))


def group_options(group: str) -> list[str]:
    """Every option of a config group, nested ones as `dmc/walker-walk`, sorted. Files named `_*.yaml` are
    shared pieces that options include (`task/_isaaclab.yaml`), not options."""
    root = config_dir() / group
    paths = (p.relative_to(root) for p in root.rglob("*.yaml"))
    return sorted(p.with_suffix("").as_posix() for p in paths if not p.name.startswith("_"))


def _is_group(key: str) -> bool:
    return bool(key) and not key.startswith("hydra") and (config_dir() / key).is_dir()


def _unknown(what: str, value: str, options: Sequence[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(value, options, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    if len(options) <= _LIST_AT_MOST:
        allowed = f" (allowed: {', '.join(options)})"
    else:
        allowed = f" ({len(options)} options in {where})"
    return ConfigError(f"{what}={value}: unknown option{hint}{allowed}")


def _parse(overrides: Sequence[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides {' '.join(overrides)}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:2]) if lines else type(exc).__name__


def _group_values(override: Override) -> list[str]:
    """The option names an override selects (several for a choice sweep `critic=lora,sparse`)."""
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except HydraException:  # range()/interval() on a group: Hydra itself reports that
            return []
    value = override.value()
    return [] if value is None else [str(value)]


def check_overrides(overrides: Sequence[str]) -> None:
    """Check every group choice (`critic=foo`, `task=dmc/chetah-run`) against the config directory, and every
    plain key (`total_env_step=5`) against the composed config, so typos fail in one line with close matches."""
    parsed = _parse(overrides)
    groups = [o for o in parsed if _is_group(o.key_or_group)]
    for override in groups:
        if override.is_delete():
            continue
        options = group_options(override.key_or_group)
        for value in _group_values(override):
            if "*" in value:  # glob(...) sweeps pick existing files by construction
                continue
            if value not in options:
                raise _unknown(override.key_or_group, value, options, f"configs/{override.key_or_group}/")
    plain = [o for o in parsed if not _is_group(o.key_or_group) and not o.key_or_group.startswith("hydra")]
    if not plain:
        return
    # Compose with the group choices only, to learn which keys exist for this selection.
    base = compose_config([o.input_line for o in groups if not o.is_sweep_override()], check=False)
    keys = _leaf_keys(base)
    # a key exists as a leaf (a `???` one included, which OmegaConf.select reports as absent) or a node above one
    known = {*keys, *(k.rsplit(".", i)[0] for k in keys for i in range(1, k.count(".") + 1))}
    for override in plain:
        if override.type == OverrideType.CHANGE and override.key_or_group not in known:
            raise _unknown_key(override.key_or_group, keys)


def _unknown_key(key: str, keys: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else "see docs/training.md for the keys"
    return ConfigError(f"{key}: no such config key; {hint} (use +{key}=... to add a new one)")


def _leaf_keys(cfg: DictConfig) -> list[str]:
    return list(_flatten(OmegaConf.to_container(cfg, resolve=False)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def compose_config(overrides: Sequence[str] = (), *, check: bool = True, with_hydra: bool = False) -> DictConfig:
    """The app's config for these overrides, as Hydra composes it, validated.

    `with_hydra=True` keeps the `hydra` node (the run directory template); `check=False` skips
    `check_overrides` and `validate_config` (used internally to list the keys)."""
    overrides = expand_shorthands(overrides)
    if check:
        check_overrides(overrides)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides), return_hydra_config=with_hydra)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"invalid overrides {' '.join(overrides)}: {_first_line(exc)}") from None
    if check:
        validate_config(cfg)
    return cfg


# ------------------------------------------------------------------------------------------------ validation


def check_device(device: str) -> None:
    """Refuse a well-formed `device` this machine does not have, in one line (torch's own errors are deep and
    multi-line). Not part of `validate_config`: a config for another machine (a cluster sweep) is still valid."""
    kind, _, index = device.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device={device}: no CUDA device is available on this machine (allowed here: cpu)")
        if index and int(index) >= count:
            raise ConfigError(f"device={device}: this machine has {count} CUDA device(s) (allowed: cpu, cuda, "
                              f"cuda:0 to cuda:{count - 1})")  # fmt: skip
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={device}: no MPS device is available on this machine (allowed here: cpu)")


def validate_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` (one line: key, value, what is allowed) on the first invalid value."""
    entry = ALGORITHMS[choice(cfg, "algo.name", ALGORITHMS)]
    int_in(cfg, "seed", 0, 2**32 - 1)  # numpy's seeding range
    device = get(cfg, "device")
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise ConfigError(f"device={device!r}: allowed cpu, cuda, cuda:<index> or mps")
    if get(cfg, "threads") != AUTO:
        int_in(cfg, "threads", 1, or_else=f" or {AUTO}")
    choice(cfg, "precision", PRECISIONS)
    for key in ("total_env_steps", "eval_every", "checkpoint_every", "eval_episodes"):
        int_in(cfg, key, 1)
    boolean(cfg, "save_buffer")
    boolean(cfg, "keep_eval_checkpoints")
    resume = get(cfg, "resume")
    if resume is not None and not (isinstance(resume, str) and resume):
        raise ConfigError(f"resume={resume!r}: allowed null, a run directory or a checkpoint file")
    if choice(cfg, "logger", LOGGERS) == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logger=wandb: the wandb package is not installed (pip install 'fasttd3-lora[wandb]')")
    choice(cfg, "wandb.mode", WANDB_MODES)
    if int_in(cfg, "video.every", 0) > 0:
        int_in(cfg, "video.height", 16)
        int_in(cfg, "video.width", 16)
        int_in(cfg, "video.camera", 0)
        if get(cfg, "task.family") == "dmc" and OmegaConf.select(cfg, "task.backend") == "envpool":
            raise ConfigError(f"video.every={get(cfg, 'video.every')}: DMC videos render with task.backend=dm_control "
                              "(EnvPool's envs are not rendered here)")  # fmt: skip

    family = choice(cfg, "task.family", TASK_FAMILIES)
    if family not in entry.families:
        families = ", ".join(entry.families[:-1]) + (" and " if len(entry.families) > 1 else "") + entry.families[-1]
        raise ConfigError(f"task.family={family!r}: {entry.name} runs {families} tasks only; "
                          f"algorithms for {family}: {', '.join(n for n, a in ALGORITHMS.items() if family in a.families)}")
    name, options = get(cfg, "task.name"), group_options("task")
    if name not in options:
        raise _unknown("task.name", str(name), options, "configs/task/")
    int_in(cfg, "task.max_episode_steps", 1)
    if family == "dmc" and boolean(cfg, "task.spread_starts") and get(cfg, "task.backend") != "dm_control":
        raise ConfigError(f"task.spread_starts=true: allowed with task.backend=dm_control only (EnvPool's episodes "
                          f"cannot be cut short here), got task.backend={get(cfg, 'task.backend')}")  # fmt: skip

    if get(cfg, "library.path") is not None and "library" not in entry.config.groups:
        raise ConfigError(f"library.path={get(cfg, 'library.path')}: a policy library trains with "
                          f"{', '.join(n for n, a in ALGORITHMS.items() if 'library' in a.config.groups)}; "
                          f"algo.name={entry.name} has none")  # fmt: skip
    if "critic" in entry.config.groups:
        _validate_critic(cfg)
    # The algorithm's own config checks its keys (with a task family's values), one line each.
    entry.config.check_hydra(cfg)


def _validate_critic(cfg: DictConfig) -> None:
    """The `critic/` and `scale/` groups of the algorithms that use them (SAC, FastTD3)."""
    hidden = int_in(cfg, "scale.critic_hidden_dim", 1)
    int_in(cfg, "scale.critic_num_blocks", 1)
    number_in(cfg, "scale.sparsity", 0.0, 1.0, lo_open=False, hi_open=True)

    kind = choice(cfg, "critic.kind", CRITIC_KINDS)
    if kind == "lora":
        # The adapted matrices are the blocks' W1 (4d x d) and W2 (d x 4d): min(d_in, d_out) = d (DESIGN §3).
        int_in(cfg, "critic.rank", 1, hidden)
        positive(cfg, "critic.alpha")
        number_in(cfg, "critic.base_init_scale", 0.0, 1.0, lo_open=True, hi_open=True)
        boolean(cfg, "critic.project")
        boolean(cfg, "critic.use_base")
        if get(cfg, "critic.base_rank") is not None:
            int_in(cfg, "critic.base_rank", 1, hidden - 1)
        number_in(cfg, "critic.warmup_fraction", 0.0, 1.0, lo_open=False, hi_open=True)


# -------------------------------------------------------------------------------------------------- resume


def merge_overrides(first: Sequence[str], then: Sequence[str]) -> list[str]:
    """`first` followed by `then`, where an override of `then` replaces one of `first` with the same key.

    A resumed run composes from the overrides of the run it continues plus the new command line."""
    merged: dict[tuple[str, str | None], str] = {}
    for override in _parse(first) + _parse(then):
        merged.pop((override.key_or_group, override.package), None)  # re-insert: the later one goes last
        merged[(override.key_or_group, override.package)] = override.input_line
    return list(merged.values())


def override_value(overrides: Sequence[str], key: str) -> Any:
    """The value the last override of `key` sets, or None."""
    values = [o.value() for o in _parse(overrides) if o.key_or_group == key and not o.is_delete()]
    return values[-1] if values else None


def drop_override(overrides: Sequence[str], key: str) -> list[str]:
    """`overrides` without those of `key` (a checkpoint stores its run's overrides without `resume`)."""
    return [o.input_line for o in _parse(overrides) if o.key_or_group != key]


def upgrade_saved(meta: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's `meta` (its config and overrides) in today's keys, so an older run resumes and exports as it
    ran: before the `precision` key, bf16 autocast was `algo.amp_bf16` (true/false); before `algo.use_cdq`, the
    FastTD3 target was always clipped double Q (and its `algo.actor_q` is kept); before the DMC family's
    `task.fasttd3`, a DMC run took the algo defaults; before EnvPool, DMC stepped dm_control (`task.backend`);
    before `task.spread_starts`, DMC episodes all started whole; before `algo.recurrent`, MAPPO's actor was an MLP."""
    config, overrides = copy.deepcopy(dict(meta["config"])), list(meta.get("overrides", []))
    algo = config.get("algo", {})
    pinned: list[str] = []  # algo keys whose default changed since: the run keeps the value it ran with
    if algo.get("name") == "fasttd3" and "use_cdq" not in algo:  # before use_cdq: min target, actor_q as saved
        algo["use_cdq"] = True
        pinned.append("actor_q")
    if algo.get("name") == "fasttd3" and "fasttd3" not in config.get("task", {}):
        pinned += FAMILY_KEYS  # before the DMC family had FastTD3 numbers, the algo defaults applied
    overrides += [f"algo.{key}={_override_literal(algo[key])}" for key in pinned
                  if key in algo and override_value(overrides, f"algo.{key}") is None]  # fmt: skip
    if algo.get("name") == "mappo" and "recurrent" not in algo:  # the GRU's keys as configured now: unused by an MLP
        defaults = OmegaConf.load(config_dir() / "algo" / "mappo.yaml")
        algo.update(recurrent=False, rnn_hidden_dim=defaults.rnn_hidden_dim, chunk_length=defaults.chunk_length,
                    rnn_after_dims=list(defaults.rnn_after_dims))  # fmt: skip
    task = config.get("task", {})
    if task.get("family") == "dmc" and "backend" not in task:  # before EnvPool, DMC was dm_control
        task["backend"] = "dm_control"
    if task.get("family") == "dmc" and "spread_starts" not in task:
        task["spread_starts"] = False
    if "precision" not in config and "amp_bf16" in algo:
        config["precision"] = "bf16" if algo.pop("amp_bf16") else "fp32"
        overrides = [o for o in overrides if o.split("=", 1)[0] != "algo.amp_bf16"] + [f"precision={config['precision']}"]
    return {**meta, "config": config, "overrides": overrides}


def _override_literal(value: Any) -> str:
    """A config value as Hydra override text (`null`, `true`, numbers and plain strings)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


# Keys a resumed run takes from its checkpoint unless the command line sets them: `auto` may resolve differently
# on another machine or under another load, and a bit-exact resume needs the same thread count and arithmetic.
RESUME_KEEPS = ("threads", "precision")


def check_resume_compatible(cfg: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """A resumed run may change only `RESUME_MAY_CHANGE`; anything else would not continue the same run."""
    now, before = _flatten(cfg), _flatten(saved)
    family_blocks = [["task", name] for name in ALGORITHMS]  # task.fasttd3.*, task.ppo.*
    for key in sorted(set(now) | set(before)):
        if key.split(".")[:2] in family_blocks:  # a family's defaults act only through the algo.* values, compared here
            continue
        if key in RESUME_MAY_CHANGE or key.split(".")[0] in RESUME_MAY_CHANGE or now.get(key, MISSING) == before.get(key, MISSING):
            continue
        raise ConfigError(
            f"{key}={now.get(key, '<absent>')!r}: a resumed run must keep the checkpoint's value "
            f"{before.get(key, '<absent>')!r} (only {', '.join(RESUME_MAY_CHANGE)} may change)"
        )
