"""A policy library on disk (DESIGN §10): one frozen base policy and any number of named LoRA adapters.

    LIB/
      library.json           the index: format, the base's facts, one entry per task (rank, alpha, sizes, eval return,
                             the run that trained it, each file's sha256)
      base.pt                the base policy (its MLP and log-std) and observation statistics: what deployment needs
      value.pt               the base's value function: only what fine-tuning a new adapter starts from
      adapters/<task>.pt     one task's adapter: every layer's A and B, and the task's log-std

Tensor files are torch files of plain tensors, read with `weights_only=True` and tagged with their kind; the index
holds every file's sha256, so a truncated, corrupt, foreign or swapped file is refused in one line
(`LibraryError`). Every file is written atomically (temporary file, fsync, rename) and index updates hold an
exclusive lock (`LIB/.lock`), so two runs finishing together do not lose each other's entries.

How networks come out of a library: `base_networks` rebuilds the base policy, its value function (one output
column per task, each a copy of the base's) and the frozen observation statistics; `attach_adapters` puts LoRA
adapters on every linear map of the policy's MLP; `adapter_tensors` / `load_adapter_tensors` move one task's
adapter between a network and a file's tensors.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fasttd3_lora.adapters import LoRALinear, add_adapters
from fasttd3_lora.checkpoint import VERSION, CheckpointError, atomic_write, load_tagged
from fasttd3_lora.mlp_policy import GaussianPolicy, ValueFunction
from fasttd3_lora.normalization import RunningMeanStd

__all__ = [
    "FORMAT",
    "INDEX",
    "LibraryError",
    "Library",
    "create_library",
    "base_networks",
    "attach_adapters",
    "adapter_tensors",
    "load_adapter_tensors",
    "tensor_bytes",
    "library_policy",
]

FORMAT = "fasttd3-lora-library/1"
INDEX = "library.json"
BASE_FILE, VALUE_FILE, ADAPTER_DIR, LOCK = "base.pt", "value.pt", "adapters", ".lock"
_KINDS = {"base": "fasttd3-lora-library-base", "value": "fasttd3-lora-library-value",
          "adapter": "fasttd3-lora-library-adapter"}  # fmt: skip


class LibraryError(ValueError):
    """A library that cannot be used as asked; the message is one line."""


def tensor_bytes(tensors: Mapping[str, Any]) -> int:
    """Bytes of the tensors in a (nested) mapping: what a file of them holds before its container's overhead."""
    total = 0
    for value in tensors.values():
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, Mapping):
            total += tensor_bytes(value)
    return total


def _serialise(kind: str, tensors: Mapping[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save({"format": _KINDS[kind], "version": VERSION, **tensors}, buffer)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> str:
    """Write `data` atomically; returns its sha256."""
    atomic_write(path, lambda f: f.write(data))
    return hashlib.sha256(data).hexdigest()


def _file_name(task: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "-" for c in task).strip("-") + ".pt"


class Library:
    """An open library directory (`Library(path)` reads and checks its index)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise LibraryError(f"library {self.path}: no {INDEX} (create one with python -m fasttd3_lora.library "
                               "create DIR --base RUN_DIR)")  # fmt: skip
        try:
            index = json.loads(index_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LibraryError(f"library {self.path}: {INDEX} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise LibraryError(f"library {self.path}: {INDEX} is not a {FORMAT} index")
        self.index: dict[str, Any] = index

    @property
    def base(self) -> dict[str, Any]:
        """The base's facts: dims, hidden sizes, task, family, action repeat, deploy facts, sizes, source run."""
        return self.index["base"]

    @property
    def entries(self) -> dict[str, dict[str, Any]]:
        """Task name -> its adapter's entry."""
        return self.index["adapters"]

    def _load(self, kind: str, name: str, sha256: str) -> dict[str, Any]:
        path = self.path / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise LibraryError(f"library {self.path}: {name} does not match its sha256 in {INDEX} (corrupt or replaced)")
        try:
            return load_tagged(path, _KINDS[kind], "library file", f"a {kind} file of a policy library")
        except CheckpointError as err:
            raise LibraryError(str(err)) from None

    def base_state(self) -> dict[str, Any]:
        """`{"policy": state dict, "obs_rms": state dict}` of the base (checked against the index)."""
        return self._load("base", BASE_FILE, self.base["sha256"])

    def value_state(self) -> dict[str, Any]:
        """`{"value": state dict}` of the base's value function."""
        return self._load("value", VALUE_FILE, self.base["value_sha256"])

    def adapter(self, task: str) -> dict[str, Any]:
        """A task's adapter file: `{"layers": {i: {"lora_A", "lora_B"}}, "log_std": (act_dim,), "scale": s}`."""
        entry = self.entries.get(task)
        if entry is None:
            raise LibraryError(f"library {self.path}: no adapter for task {task!r} (it has: "
                               f"{', '.join(self.entries) or 'none'})")  # fmt: skip
        return self._load("adapter", entry["file"], entry["sha256"])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The index re-read under an exclusive lock, and written back atomically on exit."""
        with open(self.path / LOCK, "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.index = Library(self.path).index
                yield
                _write(self.path / INDEX, json.dumps(self.index, indent=2, sort_keys=True).encode())
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def add_adapter(self, task: str, tensors: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
        """Write a task's adapter file and its index entry (replacing an earlier adapter of the task); returns the
        entry. `info` adds what the run knows (rank, alpha, eval return, env steps, run directory, seed)."""
        name = f"{ADAPTER_DIR}/{_file_name(task)}"
        data = _serialise("adapter", tensors)
        sha = _write(self.path / name, data)
        entry = {**info, "file": name, "sha256": sha, "bytes_on_disk": len(data),
                 "tensor_bytes": tensor_bytes(tensors),
                 "trainable": sum(t.numel() for key, t in _tensors(tensors) if key != "scale")}  # fmt: skip
        with self._locked():
            self.index["adapters"][task] = entry
        return entry

    def remove(self, task: str) -> None:
        """Drop a task's adapter (entry and file)."""
        with self._locked():
            entry = self.index["adapters"].pop(task, None)
            if entry is None:
                raise LibraryError(f"library {self.path}: no adapter for task {task!r} (it has: "
                                   f"{', '.join(self.index['adapters']) or 'none'})")  # fmt: skip
        (self.path / entry["file"]).unlink(missing_ok=True)


def _tensors(tree: Mapping[str, Any]) -> Iterator[tuple[str, Tensor]]:
    """(key, tensor) of every tensor in a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, Tensor):
            yield key, value
        elif isinstance(value, Mapping):
            yield from _tensors(value)


def create_library(path: str | Path, state: Mapping[str, Any], source: str | Path) -> Library:
    """A new library at `path` whose base is the policy of a PPO run's checkpoint `state` (from `source`). It is
    written into a temporary directory beside `path` and renamed into place, so a library is whole or absent;
    when several runs of a sweep create the same one at once, the first rename wins and the others open it."""
    path = Path(path).expanduser()
    if path.exists() and any(path.iterdir()):
        raise LibraryError(f"library {path}: the directory exists and is not empty")
    meta = state.get("meta", {})
    config = meta.get("config", {})
    algo = config.get("algo", {})
    if algo.get("name") != "ppo":
        raise LibraryError(f"--base {source}: a library's base is a PPO run (algo=ppo), this one is "
                           f"algo={algo.get('name')!r}")  # fmt: skip
    if config.get("library", {}).get("path") is not None:
        raise LibraryError(f"--base {source}: a library run (its policy carries adapters); a base is a plain PPO run")
    agent = state["agent"]
    policy, value, rms = agent["actor"], agent["value"], agent["obs_rms"]
    act_dim, obs_dim = policy["log_std"].shape[-1], rms["mean"].shape[-1]
    base = {
        "task": config["task"]["name"], "family": config["task"]["family"], "seed": config.get("seed"),
        "source": str(Path(source).resolve()), "env_step": meta.get("counters", {}).get("env_step"),
        "eval_return": meta.get("counters", {}).get("last_eval_return"),
        "obs_dim": int(obs_dim), "act_dim": int(act_dim), "action_repeat": int(algo["action_repeat"]),
        "actor_hidden_dims": list(algo["actor_hidden_dims"]), "critic_hidden_dims": list(algo["critic_hidden_dims"]),
        "init_std": float(algo["init_std"]), "max_episode_steps": config["task"].get("max_episode_steps"),
        "env": meta.get("env") or {},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        (tmp / ADAPTER_DIR).mkdir()
        data = _serialise("base", {"policy": dict(policy), "obs_rms": dict(rms)})
        base["sha256"], base["bytes_on_disk"] = _write(tmp / BASE_FILE, data), len(data)
        base["policy_numel"] = sum(t.numel() for t in policy.values())
        base["policy_tensor_bytes"] = tensor_bytes(policy)
        value_data = _serialise("value", {"value": dict(value)})
        base["value_sha256"], base["value_bytes_on_disk"] = _write(tmp / VALUE_FILE, value_data), len(value_data)
        _write(tmp / INDEX, json.dumps({"format": FORMAT, "base": base, "adapters": {}}, indent=2, sort_keys=True).encode())
        if path.exists():
            path.rmdir()  # empty (checked above): the rename needs the name free
        os.rename(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if (path / INDEX).is_file():  # another run created it first
            return Library(path)
        raise LibraryError(f"library {path}: cannot be created ({err.strerror or err})") from None
    return Library(path)


# ------------------------------------------------------------------------------------ networks and adapters


def base_networks(library: Library, num_tasks: int, obs_dim: int, act_dim: int) -> tuple[GaussianPolicy, ValueFunction, RunningMeanStd]:
    """The base policy (one log-std row per task, each the base's), its value function (one output per task,
    each a copy of the base's) and observation statistics, for an env of `obs_dim` / `act_dim` (refused in one
    line when the base was trained on another)."""
    base = library.base
    if (obs_dim, act_dim) != (base["obs_dim"], base["act_dim"]):
        raise LibraryError(f"library {library.path}: its base takes {base['obs_dim']} observations and "
                           f"{base['act_dim']} actions ({base['task']}); this env has {obs_dim} and {act_dim}")  # fmt: skip
    state, value_state = library.base_state(), library.value_state()["value"]
    policy = GaussianPolicy(obs_dim, act_dim, base["actor_hidden_dims"], base["init_std"], num_tasks=num_tasks)
    weights = {k: v for k, v in state["policy"].items() if k != "log_std"}
    policy.load_state_dict({**weights, "log_std": state["policy"]["log_std"][:1].expand(num_tasks, -1).clone()})
    value = ValueFunction(obs_dim, base["critic_hidden_dims"], num_tasks=num_tasks)
    last = len(value.net.layers) - 1
    value_state = dict(value_state)
    for key in (f"net.layers.{last}.weight", f"net.layers.{last}.bias"):
        value_state[key] = value_state[key][:1].expand(num_tasks, *value_state[key].shape[1:]).clone()
    value.load_state_dict(value_state)
    rms = RunningMeanStd(obs_dim)
    rms.load_state_dict(state["obs_rms"])
    return policy, value, rms


def attach_adapters(policy: GaussianPolicy, rank: int, num_adapters: int, alpha: float | None = None) -> list[LoRALinear]:
    """LoRA adapters (B = 0: each starts as the base) on every linear map of the policy's MLP, whose weights are
    frozen from here on; the log-std rows stay trainable. A layer narrower than `rank` (the action head) takes
    rank min(in, out) at the same scale `alpha / rank`."""
    return add_adapters(policy.mean_net, list(policy.mean_net.layers), rank=rank, num_adapters=num_adapters, alpha=alpha)


def _adapted(policy: GaussianPolicy) -> list[LoRALinear]:
    layers = list(policy.mean_net.layers)
    if not all(isinstance(layer, LoRALinear) for layer in layers):
        raise LibraryError("the policy carries no adapters (attach_adapters first)")
    return layers  # type: ignore[return-value]


def adapter_tensors(policy: GaussianPolicy, k: int) -> dict[str, Any]:
    """Adapter k of an adapted policy as a file's tensors (`Library.add_adapter`): per layer A, B and its scale."""
    return {"layers": {str(i): {**layer.adapter_state(k), "scale": torch.tensor(layer.scale)}
                       for i, layer in enumerate(_adapted(policy))},
            "log_std": policy.log_std[k].detach().clone()}  # fmt: skip


def _file_rank(tensors: Mapping[str, Any]) -> int:
    return max(int(layer["lora_A"].shape[-2]) for layer in tensors["layers"].values())


@torch.no_grad()
def load_adapter_tensors(policy: GaussianPolicy, k: int, tensors: Mapping[str, Any]) -> None:
    """Write a file's adapter into adapter k of `policy`, whose adapters may have a larger rank: the factors are
    zero-padded (the extra rank adds nothing) and each layer's saved scale is folded into B relative to the
    layer's, so the merged map is exactly the one the adapter was trained as."""
    layers = _adapted(policy)
    saved = tensors["layers"]
    if len(saved) != len(layers):
        raise LibraryError(f"adapter has {len(saved)} layers, the policy {len(layers)}")
    for i, layer in enumerate(layers):
        a, b, scale = saved[str(i)]["lora_A"], saved[str(i)]["lora_B"], float(saved[str(i)]["scale"])
        rank = a.shape[-2]
        if rank > layer.rank or a.shape[-1] != layer.in_features or b.shape[-2] != layer.out_features:
            raise LibraryError(f"adapter layer {i}: factors {tuple(a.shape)} / {tuple(b.shape)} do not fit a rank "
                               f"<= {layer.rank} adapter of a {layer.in_features} -> {layer.out_features} map")  # fmt: skip
        padded_a, padded_b = torch.zeros_like(layer.lora_A[k]), torch.zeros_like(layer.lora_B[k])
        padded_a[..., :rank, :] = a
        padded_b[..., :rank] = b * (scale / layer.scale)
        layer.load_adapter_state_(k, {"lora_A": padded_a, "lora_B": padded_b})
    policy.log_std[k].copy_(tensors["log_std"])


def library_policy(library: Library, tasks: Sequence[str]) -> tuple[GaussianPolicy, RunningMeanStd]:
    """The base policy with one adapter per task of `tasks` (in that order), at the largest of their ranks."""
    if not tasks:
        raise LibraryError(f"library {library.path}: no adapters to build a policy of")
    files = [library.adapter(task) for task in tasks]
    base = library.base
    policy, _, rms = base_networks(library, len(tasks), base["obs_dim"], base["act_dim"])
    attach_adapters(policy, max(_file_rank(f) for f in files), len(tasks))  # scale 1; each file's scale folds in
    for k, tensors in enumerate(files):
        load_adapter_tensors(policy, k, tensors)
    if not all(bool(torch.isfinite(p).all()) for p in policy.parameters()):
        raise LibraryError(f"library {library.path}: an adapter holds non-finite values")
    return policy, rms
