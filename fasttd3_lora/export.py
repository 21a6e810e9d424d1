"""ONNX export of a trained actor for deployment (DESIGN §8; docs/deploy.md, "Deploy to a robot").

``python -m fasttd3_lora.export <run dir or checkpoint> [out=DIR]`` writes

* ``policy.onnx``: ``actor.deterministic_action(normalise(obs))`` with the observation normaliser folded in,
  opset 18, one input ``obs`` (float32, [batch, obs_dim]), one output ``actions`` (float32,
  [batch, act_dim], in [-1, 1]), dynamic batch;
* ``deploy.yaml``: what a deploy stack needs (task, observation dim and layout, action dim, how ``actions``
  map to the env's command -- ``offset + scale * clip(actions, low, high)`` -- joint names in the trained
  order where the env names them, control period, training step, package version). Every top-level key is
  also an ONNX ``metadata_props`` entry, its value JSON-encoded.

After writing, the model is run in onnxruntime on observations drawn from the run's normaliser statistics and
compared with the PyTorch policy; the export fails when they differ by more than ``tolerance`` (1e-4).

What is read from a checkpoint (``fasttd3_lora.checkpoint`` format, loaded with ``weights_only=True``):
``meta.config`` (``task.name``, ``task.family``, ``algo.name``, ``algo.actor_hidden_dim``,
``algo.actor_num_blocks``, ``critic.kind``, ``seed``), ``meta.counters`` (``env_step``, ``agent_step``),
``agent.actor`` (the actor's state dict: ``TanhGaussianActor`` for ``algo.name=sac``, ``DeterministicActor``
for ``fasttd3``), ``agent.obs_rms`` (the observation normaliser's state dict; absent: raw observations) and,
when the training app recorded it, ``meta.env`` (the output of `env_deploy_facts`). Without ``meta.env`` the
env is built once from the run's config (``fasttd3_lora.envs.make_envs``) and asked directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from torch import Tensor, nn

import fasttd3_lora
from fasttd3_lora.checkpoint import CHECKPOINT_DIR, LATEST, CheckpointError, load_checkpoint, run_dir_of
from fasttd3_lora.algorithms import ALGORITHMS, Algorithm
from fasttd3_lora.config import path_safe, upgrade_saved
from fasttd3_lora.envs import TASK_FAMILIES, EnvRequest, env_deploy_facts, make_envs
from fasttd3_lora.normalization import RunningMeanStd

__all__ = [
    "ACTOR_TYPES",
    "DEPLOY_FORMAT",
    "OPSET",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "HIDDEN_INPUT",
    "HIDDEN_OUTPUT",
    "METADATA_KEYS",
    "ExportError",
    "ExportResult",
    "DeployPolicy",
    "IndexedPolicy",
    "policy_from_checkpoint",
    "deploy_metadata",
    "export_onnx",
    "export_graph",
    "quiet_exporter",
    "read_metadata",
    "write_metadata",
    "sample_observations",
    "verify_onnx",
    "export_checkpoint",
    "main",
]

# The actors an algorithm of the registry trains (each has `deterministic_action`).
ACTOR_TYPES = tuple(dict.fromkeys(entry.actor for entry in ALGORITHMS.values()))
DEPLOY_FORMAT = "fasttd3-lora-deploy/1"
OPSET = 18
INPUT_NAME = "obs"
OUTPUT_NAME = "actions"
HIDDEN_INPUT, HIDDEN_OUTPUT = "hidden", "next_hidden"  # a recurrent actor's state, in and out
POLICY_FILE = "policy.onnx"
DEPLOY_FILE = "deploy.yaml"
EXPORT_DIR = "export"
# The top-level keys of deploy.yaml, each also an ONNX metadata_props entry (docs/deploy.md lists them).
METADATA_KEYS = (
    "format", "package_version", "task", "algo", "critic", "actor", "seed", "training", "model", "index",
    "observation", "action", "control_period_s", "verification",
)  # fmt: skip


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an export that failed its check; the message is one line."""


class DeployPolicy(nn.Module):
    """``actor.deterministic_action(normalise(obs))``: the graph that is exported (DESIGN §8).

    SAC's ``TanhGaussianActor`` gives ``tanh(mean)``, TD3's ``DeterministicActor`` its ``tanh`` output, so
    ``actions`` lie in [-1, 1] either way. ``obs_normalizer=None`` exports an actor trained on raw observations.
    A recurrent actor (one with an ``rnn_dim``) takes its hidden state as a last input and returns the next one
    as a second output (zeros at an episode's start; the caller feeds ``next_hidden`` back).
    """

    def __init__(self, actor: nn.Module, obs_normalizer: RunningMeanStd | None, obs_dim: int) -> None:
        super().__init__()
        if not isinstance(actor, nn.Module) or not callable(getattr(actor, "deterministic_action", None)):
            names = ", ".join(t.__name__ for t in ACTOR_TYPES)
            raise ExportError(f"actor must be a policy with deterministic_action ({names}, ...), got {type(actor).__name__}")
        if obs_normalizer is not None and not isinstance(obs_normalizer, RunningMeanStd):
            raise ExportError(f"obs_normalizer must be a RunningMeanStd or None, got {type(obs_normalizer).__name__}")
        if obs_normalizer is not None and tuple(obs_normalizer.shape) != (obs_dim,):
            raise ExportError(f"obs normaliser has shape {tuple(obs_normalizer.shape)}, the actor takes ({obs_dim},)")
        self.actor = actor
        self.obs_normalizer = obs_normalizer
        self.obs_dim = obs_dim
        self.rnn_dim: int | None = getattr(actor, "rnn_dim", None)
        # One dry run: checks that the actor takes obs_dim inputs and tells the action dimension.
        try:
            with torch.no_grad():
                out = self(*self.example_inputs(1))
                self.act_dim = int((out[0] if self.rnn_dim else out).shape[-1])
        except RuntimeError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExportError(f"the actor does not take {obs_dim}-dim observations: {first}") from e

    @property
    def input_names(self) -> list[str]:
        return [INPUT_NAME, *([HIDDEN_INPUT] if self.rnn_dim else [])]

    @property
    def output_names(self) -> list[str]:
        return [OUTPUT_NAME, *([HIDDEN_OUTPUT] if self.rnn_dim else [])]

    def example_inputs(self, batch: int) -> tuple[Tensor, ...]:
        """Zero inputs of `batch` rows, in `input_names` order."""
        return (torch.zeros(batch, self.obs_dim), *([torch.zeros(batch, self.rnn_dim)] if self.rnn_dim else []))

    def forward(self, obs: Tensor, hidden: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return self._act(obs, (), hidden)

    def _act(self, obs: Tensor, index: tuple[Tensor, ...], hidden: Tensor | None) -> Tensor | tuple[Tensor, Tensor]:
        if self.obs_normalizer is not None:
            obs = self.obs_normalizer(obs)
        if self.rnn_dim is None:
            return self.actor.deterministic_action(obs, *index)
        return self.actor.deterministic_action(obs, index[0] if index else None, hidden)


class IndexedPolicy(DeployPolicy):
    """``actor.deterministic_action(normalise(obs), index)``: each row through its task's or agent's map (a policy
    library's, a multi-agent actor's); `index_name` is the second ONNX input, `index_values` names its values."""

    def __init__(self, actor: nn.Module, obs_normalizer: RunningMeanStd | None, obs_dim: int, index_name: str,
                 index_values: Sequence[str]) -> None:  # fmt: skip
        self.index_name, self.index_values = index_name, list(index_values)
        super().__init__(actor, obs_normalizer, obs_dim)

    @property
    def input_names(self) -> list[str]:
        names = super().input_names
        return [names[0], self.index_name, *names[1:]]

    def example_inputs(self, batch: int) -> tuple[Tensor, ...]:
        obs, *hidden = super().example_inputs(batch)
        return (obs, torch.zeros(batch, dtype=torch.long), *hidden)

    def forward(self, obs: Tensor, index: Tensor | None = None, hidden: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:  # type: ignore[override]
        index = torch.zeros(obs.shape[0], dtype=torch.long) if index is None else index
        return self._act(obs, (index,), hidden)


def _set_metadata(model: Any, metadata: Mapping[str, Any]) -> None:
    """Replace a ModelProto's metadata_props by ``metadata``, each value JSON-encoded (JSON is a subset of YAML,
    so a value reads back the same from the model and from deploy.yaml)."""
    import onnx

    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=str(key), value=json.dumps(value, sort_keys=True)))


def write_metadata(path: str | Path, metadata: Mapping[str, Any]) -> None:
    """Set the metadata_props of the ONNX model at ``path`` to ``metadata``."""
    import onnx

    model = onnx.load_model(str(path))
    _set_metadata(model, metadata)
    onnx.save_model(model, str(path))


def export_onnx(policy: DeployPolicy, path: str | Path) -> Path:
    """Write ``policy`` as an opset-18 ONNX model (its `input_names`: ``obs``, the index input of an
    `IndexedPolicy`, a recurrent actor's ``hidden``; its `output_names`: ``actions`` and ``next_hidden``; dynamic
    batch axis); `write_metadata` adds the deploy facts once the model has passed its check."""
    batch = torch.export.Dim("batch")
    examples = policy.example_inputs(2)
    return export_graph(policy, examples, policy.input_names, tuple({0: batch} for _ in examples), path,
                        policy.output_names)  # fmt: skip


def export_graph(module: nn.Module, examples: tuple[Tensor, ...], input_names: Sequence[str],
                 dynamic_shapes: tuple[dict[int, Any], ...], path: str | Path,
                 output_names: Sequence[str] = (OUTPUT_NAME,)) -> Path:  # fmt: skip
    """Any eval-mode `module` as an opset-18 ONNX model (output ``actions`` by default; the policy library's model
    takes ``obs`` and ``task_id``), checked by onnx's checker."""
    import onnx

    path = Path(path)
    module = module.eval()
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            examples,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_shapes=dynamic_shapes,
            external_data=False,
            verbose=False,
        )
    model = program.model_proto
    model.producer_name = "fasttd3-lora"
    model.producer_version = fasttd3_lora.__version__
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata_props of an exported model, JSON-decoded."""
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in model.metadata_props}


def sample_observations(
    normalizer: RunningMeanStd | None, obs_dim: int, num: int, generator: torch.Generator | None = None
) -> Tensor:
    """``num`` observations ~ N(mean, var) of the run's statistics (N(0, 1) without a normaliser)."""
    z = torch.randn(num, obs_dim, generator=generator)
    if normalizer is None:
        return z
    return normalizer.mean.float() + normalizer.var.float().clamp_min(0).sqrt() * z


RECURRENT_CHECK_STEPS = 3  # a recurrent model is checked over this many steps, each feeding its state back


def verify_onnx(path: str | Path, policy: DeployPolicy, obs: Tensor, tolerance: float = 1e-4) -> float:
    """Max |onnxruntime - PyTorch| over ``obs`` (every output; a recurrent policy over `RECURRENT_CHECK_STEPS`
    steps from zero states, each side feeding its own next state back); raises ``ExportError`` above
    ``tolerance``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    obs32 = obs.detach().to(torch.float32).cpu()
    args = list(policy.example_inputs(len(obs32)))
    args[0] = obs32
    if isinstance(policy, IndexedPolicy):  # every index, in turn over the rows
        args[1] = torch.arange(len(obs32)) % len(policy.index_values)
    onnx_args, diff = list(args), 0.0
    for _ in range(RECURRENT_CHECK_STEPS if policy.rnn_dim else 1):
        onnx_out = session.run(policy.output_names, {n: a.numpy() for n, a in zip(policy.input_names, onnx_args)})
        with torch.no_grad():
            torch_out = policy.eval()(*args)
        torch_out = [t.numpy() for t in (torch_out if policy.rnn_dim else (torch_out,))]
        for mine, theirs in zip(onnx_out, torch_out):
            if mine.shape != theirs.shape:
                raise ExportError(f"onnxruntime returned shape {mine.shape}, PyTorch {theirs.shape}")
            diff = max(diff, float(np.max(np.abs(mine - theirs))))
        if not math.isfinite(diff) or diff > tolerance:
            raise ExportError(f"{path}: onnxruntime and PyTorch differ by {diff:.3g} > tolerance {tolerance:g}")
        args[-1], onnx_args[-1] = torch.from_numpy(torch_out[-1]), torch.from_numpy(onnx_out[-1])  # the next states
    return diff


# ----------------------------------------------------------------------------------------- deploy facts


def _facts_from_run(state: Mapping[str, Any], source: Path) -> dict[str, Any]:
    """Build the run's env once (one env, in-process) and ask it (`env_deploy_facts`)."""
    from omegaconf import OmegaConf

    family = _get(state, "meta.config.task.family", source)
    if family not in TASK_FAMILIES:
        raise ExportError(f"task.family={family}: no env builder to read deploy facts from; allowed {sorted(TASK_FAMILIES)}")
    config = OmegaConf.create(upgrade_saved(state["meta"])["config"])
    algo_cfg = _algorithm(state, source).config.from_hydra(config)
    # one env of each kind is enough to ask
    request = EnvRequest(config.task, 1, algo_cfg.action_repeat, int(config.seed), str(config.device), 1)
    env, eval_env = make_envs(request)
    try:
        return env_deploy_facts(env)
    except ValueError as err:
        raise ExportError(f"{source}: {err}") from None
    finally:
        env.close()
        if eval_env is not env:
            eval_env.close()


# ------------------------------------------------------------------------------------------- checkpoint


def _get(tree: Mapping[str, Any], dotted: str, source: Path) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise ExportError(f"{source}: checkpoint has no {dotted} (not a training checkpoint of this package?)")
        node = node[key]
    return node


def _algorithm(state: Mapping[str, Any], source: Path) -> Algorithm:
    name = _get(state, "meta.config.algo.name", source)
    if name not in ALGORITHMS:
        raise ExportError(f"{source}: algo.name={name!r} has no exportable actor; allowed {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def _actor_of(state: Mapping[str, Any], source: Path, obs_dim: int, act_dim: int) -> tuple[nn.Module, RunningMeanStd | None]:
    """The actor (weights loaded strictly) and observation normaliser of a loaded checkpoint; the registry's
    `build_actor` rebuilds the actor from the checkpoint's meta (SAC, FastTD3: the actor's width and depth; GRPO:
    its source run) or its saved state (PPO, MAPPO)."""
    entry = _algorithm(state, source)
    actor_state = _get(state, "agent.actor", source)
    rms_state = state["agent"].get("obs_rms")
    try:
        actor = entry.build_actor(state["meta"], actor_state, obs_dim, act_dim)
        actor.load_state_dict(actor_state)
        normalizer = None
        if rms_state is not None:
            normalizer = RunningMeanStd(tuple(rms_state["mean"].shape))
            normalizer.load_state_dict(rms_state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{source}: agent.actor / agent.obs_rms do not fit {entry.actor.__name__} (obs {obs_dim}, "
                          f"act {act_dim}): {first[:200]}") from None  # fmt: skip
    return actor.eval(), normalizer


def _index(state: Mapping[str, Any], actor: nn.Module, facts: Mapping[str, Any]) -> tuple[str, list[str]] | None:
    """(input name, the names of its values) for an actor of several tasks (a library run) or agents, else None."""
    count = int(getattr(actor, "num_tasks", 1))
    name = ALGORITHMS[state["meta"]["config"]["algo"]["name"]].index_input
    if count < 2 or name is None:
        return None
    agents = facts.get("agents")
    names = [a["name"] for a in agents] if agents else state["meta"]["config"].get("library", {}).get("tasks") or []
    return name, [str(n) for n in names] if len(names) == count else [str(i) for i in range(count)]


def policy_from_checkpoint(state: Mapping[str, Any], source: Path, obs_dim: int, act_dim: int) -> DeployPolicy:
    """The deployed policy of a loaded checkpoint (observation normaliser and deterministic action); an actor of
    several tasks or agents as an `IndexedPolicy` (its second input says each row's)."""
    actor, normalizer = _actor_of(state, source, obs_dim, act_dim)
    facts = state["meta"].get("env") or {}
    index = _index(state, actor, facts)
    if index is not None:
        return IndexedPolicy(actor, normalizer, obs_dim, *index)
    return DeployPolicy(actor, normalizer, obs_dim)


def deploy_metadata(
    config: Mapping[str, Any],
    counters: Mapping[str, Any],
    facts: Mapping[str, Any],
    policy: DeployPolicy,
    verification: Mapping[str, Any],
) -> dict[str, Any]:
    """deploy.yaml's content (also the ONNX metadata_props), in `METADATA_KEYS` order."""
    observation = dict(facts["observation"])
    observation["normalization"] = (
        "none" if policy.obs_normalizer is None
        else f"folded into the model (running mean/var of {int(policy.obs_normalizer.num_samples)} observations); "
        "feed raw observations"
    )  # fmt: skip
    action = dict(facts["action"])
    action["command"] = "offset + scale * clip(actions, clip.low, clip.high), per dimension" + (
        "; then target = moving_average * command + (1 - moving_average) * previous target, per dimension"
        if action.get("moving_average") is not None else ""
    )
    meta = {
        "format": DEPLOY_FORMAT,
        "package_version": fasttd3_lora.__version__,
        "task": str(config["task"]["name"]),
        "algo": str(config["algo"]["name"]),
        "critic": str(config.get("critic", {}).get("kind", "none")),  # PPO has a value function, no critic group
        "actor": type(policy.actor).__name__,
        "seed": int(config.get("seed", 0)),
        "training": {"env_step": int(counters.get("env_step", 0)), "agent_step": int(counters.get("agent_step", 0))},
        "model": {"file": POLICY_FILE, "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
                  "dtype": "float32", "input_shape": ["batch", policy.obs_dim],
                  "output_shape": ["batch", policy.act_dim],
                  "recurrent_state": None if not policy.rnn_dim else {
                      "input": HIDDEN_INPUT, "output": HIDDEN_OUTPUT, "dtype": "float32", "shape": ["batch", policy.rnn_dim],
                      "use": "zeros at each episode's start; feed next_hidden back as hidden at the next step"}},  # fmt: skip
        "index": None if not isinstance(policy, IndexedPolicy) else {
            "input": policy.index_name, "dtype": "int64", "shape": ["batch"], "values": policy.index_values,
            "per_value_models": {v: f"policy_{path_safe(v)}.onnx" for v in policy.index_values},
            # a multi-agent env's agents: each reads the first obs_dim entries of its padded observation (the rest
            # zeros) and uses the first act_dim of its actions, mapped as low + (a + 1) / 2 * (high - low)
            **({"agents": list(facts["agents"])} if facts.get("agents") else {})},
        "observation": observation,
        "action": action,
        "control_period_s": facts["control_period_s"],
        "verification": dict(verification),
    }
    assert tuple(meta) == METADATA_KEYS
    return meta


@dataclass(frozen=True)
class ExportResult:
    policy_path: Path
    deploy_path: Path
    max_abs_diff: float
    metadata: dict[str, Any]


def _resolve_source(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        latest = path / CHECKPOINT_DIR / LATEST
        if not latest.is_file():
            raise ExportError(f"{source}: a directory without {CHECKPOINT_DIR}/{LATEST} (not a run directory)")
        return latest
    if not path.is_file():
        raise ExportError(f"{source}: no such run directory or checkpoint file")
    return path


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """torch.onnx's exporter prints progress and warns about optional registrations; the CLI prints one summary."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_checkpoint(
    source: str | Path,
    out: str | Path | None = None,
    *,
    num_obs: int = 1000,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ExportResult:
    """Export a run directory (its ``checkpoints/latest.pt``) or a checkpoint file to ``out``.

    ``out`` defaults to ``<run dir>/export`` (a loose checkpoint: its own directory). The exported model is
    checked in onnxruntime against PyTorch on ``num_obs`` observations drawn from the run's normaliser statistics
    (``seed``) before policy.onnx and deploy.yaml are written; raises `ExportError` / `CheckpointError` (one
    line) on failure, leaving no policy.onnx behind."""
    if num_obs < 1:
        raise ExportError(f"num_obs must be >= 1, got {num_obs}")
    checkpoint = _resolve_source(source)
    state = load_checkpoint(checkpoint)
    config = _get(state, "meta.config", checkpoint)
    _algorithm(state, checkpoint)  # an unexportable algorithm fails before any env is built
    counters = state["meta"].get("counters", {})
    facts = state["meta"].get("env") or _facts_from_run(state, checkpoint)
    policy = policy_from_checkpoint(state, checkpoint, facts["observation"]["dim"], facts["action"]["dim"])
    if out is None:
        run_dir = run_dir_of(checkpoint)
        out = run_dir / EXPORT_DIR if run_dir is not None else checkpoint.parent
    out = Path(out)
    obs = sample_observations(policy.obs_normalizer, policy.obs_dim, num_obs, torch.Generator().manual_seed(seed))
    policy_path, deploy_path = out / POLICY_FILE, out / DEPLOY_FILE
    # Written under a temporary name and checked there: a model that fails its check never lands as policy.onnx.
    candidate = out / f".{POLICY_FILE}.tmp"
    try:
        with quiet_exporter():
            export_onnx(policy, candidate)
        diff = verify_onnx(candidate, policy, obs, tolerance)
        if isinstance(policy, IndexedPolicy):  # one merged model per task / agent beside the indexed one
            for k, value in enumerate(policy.index_values):
                merged = DeployPolicy(policy.actor.merged(k), policy.obs_normalizer, policy.obs_dim)
                path = out / f"policy_{path_safe(value)}.onnx"
                with quiet_exporter():
                    export_onnx(merged, path)
                diff = max(diff, verify_onnx(path, merged, obs, tolerance))
        import onnxruntime

        verification = {"runtime": f"onnxruntime {onnxruntime.__version__}", "num_obs": num_obs,
                        "obs_source": "N(mean, var) of the run's observation statistics", "seed": seed,
                        "max_abs_diff": diff, "tolerance": tolerance}  # fmt: skip
        metadata = deploy_metadata(config, counters, facts, policy, verification)
        write_metadata(candidate, metadata)
        os.replace(candidate, policy_path)
    finally:
        candidate.unlink(missing_ok=True)
    deploy_path.write_text(yaml.safe_dump(metadata, sort_keys=False, default_flow_style=None, width=120))
    return ExportResult(policy_path, deploy_path, diff, metadata)


# ------------------------------------------------------------------------------------------ command line

USAGE = "usage: python -m fasttd3_lora.export <run dir or checkpoint> [out=DIR]"
EXIT_ERROR = 2


def _fail(message: str) -> NoReturn:
    print(f"fasttd3-export: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fasttd3_lora.export <run dir or checkpoint> [out=DIR]``; errors: one line, exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    positional = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    if len(positional) != 1:
        _fail(f"expected one run directory or checkpoint, got {len(positional)} ({USAGE})")
    unknown = sorted(set(options) - {"out"})
    if unknown:
        _fail(f"unknown option {unknown[0]}=...; allowed: out=DIR")
    try:
        result = export_checkpoint(positional[0], options.get("out"))
    except (ExportError, CheckpointError) as err:
        _fail(str(err))
    print(f"wrote {result.policy_path} and {result.deploy_path}")
    print(f"onnxruntime vs PyTorch: max abs difference {result.max_abs_diff:.3g} over "
          f"{result.metadata['verification']['num_obs']} observations (tolerance {result.metadata['verification']['tolerance']:g})")  # fmt: skip


if __name__ == "__main__":
    main()
