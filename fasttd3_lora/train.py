"""The training app: `python -m fasttd3_lora.train [key=value ...]` (or `fasttd3-train`); docs/training.md.

`main` checks the command line first (group choices, key names, values, the checkpoint to resume) and stops with
one line and exit code 2 before any work starts. It then hands the overrides to Hydra, whose job runs `train`:

    every agent step          act (uniformly random before learning_starts), step the envs, store the transition,
                              then updates_per_step agent updates; a non-finite loss or Q stops the run (exit 3)
    every eval_every steps    eval_episodes deterministic episodes on separate envs
    every checkpoint_every    checkpoints/latest.pt, then every training episode restarts (see below)

Exact resume. The envs' simulator state is not saved: instead every checkpoint ends all training episodes (the
last transition is stored as a time-out, which bootstraps) and the next ones start from `reset` with seeds
derived from (seed, env_step). An uninterrupted run does the same at the same steps, so a run resumed from a
checkpoint continues bit-identically (on the same device and thread count). With the defaults the checkpoint
interval is a multiple of DMC's 1000-step episodes, so no episode is actually cut short.

Steps are simulator steps (`env_step`, DESIGN §5) unless named agent steps: one agent step is num_envs x
action_repeat env steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Protocol

import hydra
import numpy as np
import torch
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict
from torch import Tensor

from fasttd3_lora.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    CheckpointError,
    atomic_write,
    capture_rng,
    copy_checkpoint,
    find_nonfinite,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    run_dir_of,
    save_checkpoint,
)
from fasttd3_lora.config import (
    ALGORITHMS,
    TASK_FAMILIES,
    ConfigError,
    check_device,
    check_overrides,
    check_resume_compatible,
    compose_config,
    drop_override,
    merge_overrides,
    override_value,
    validate_config,
)
from fasttd3_lora.export import env_deploy_facts
from fasttd3_lora.replay import NStepReplayBuffer, ReplayBuffer, ReplayMemoryError
from fasttd3_lora.run_logging import Progress, RunLogger
from fasttd3_lora.run_status import read_status, recording_outcome, write_status
from fasttd3_lora.sac import SAC, SACConfig
from fasttd3_lora.threads import apply_threads

if TYPE_CHECKING:
    from torchrl.envs import EnvBase

    from fasttd3_lora.tasks.dmc import DMCEnv
    from fasttd3_lora.tasks.isaaclab import IsaacLabEnv

__all__ = ["EXIT_CONFIG", "EXIT_NONFINITE", "NonFiniteError", "Counters", "episode_seed", "evaluate", "train", "main"]

EXIT_CONFIG = 2  # bad command line, config value or checkpoint
EXIT_NONFINITE = 3  # the guard stopped a run
EXIT_INTERRUPTED = 130  # Ctrl-C


class NonFiniteError(RuntimeError):
    """A loss, a Q value or a parameter became NaN or infinite; the message names it and the step."""


class Agent(Protocol):
    """What the loop needs of an agent (`fasttd3_lora.sac.SAC`; FastTD3 later)."""

    num_updates: int

    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor: ...
    def record(self, obs: Tensor, reward: Tensor, done: Tensor) -> None: ...
    def update(self, batch: TensorDict) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: Any) -> None: ...


def build_sac(
    cfg: DictConfig, obs_dim: int, act_dim: int, total_updates: int, device: torch.device, generator: torch.Generator
) -> tuple[Agent, ReplayBuffer]:
    sac_cfg = SACConfig.from_hydra(cfg, max_episode_steps=cfg.task.max_episode_steps)
    agent = SAC(sac_cfg, obs_dim, act_dim, cfg.algo.num_envs, total_updates, device, generator)
    return agent, ReplayBuffer(cfg.algo.buffer_size, obs_dim, act_dim, device=device)


def make_dmc_envs(cfg: DictConfig) -> tuple[DMCEnv, DMCEnv]:
    """The training envs and the evaluation envs (one per eval episode, DESIGN §5)."""
    # Each env family is imported by its builder: a run loads only its own simulator, and a bad command line
    # is refused before any simulator loads. Training never renders: without MUJOCO_GL, importing dm_control
    # probes GLFW/EGL and warns on machines without a display (a user's own MUJOCO_GL wins).
    os.environ.setdefault("MUJOCO_GL", "disabled")
    from fasttd3_lora.tasks.dmc import DMCEnv

    def envs(num_envs: int, num_workers: int | None) -> DMCEnv:
        return DMCEnv(cfg.task.name, num_envs, action_repeat=cfg.algo.action_repeat, seed=cfg.seed,
                      max_episode_steps=cfg.task.max_episode_steps, num_workers=num_workers)  # fmt: skip

    # Evaluation steps its envs in this process: worker processes would compete with torch's threads for the
    # same cores (on a busy 2-core machine an eval step took 16 ms in-process vs 24 ms with workers, 260-320 ms
    # with 2 torch threads either way), and ten DMC envs cost little next to the actor.
    return envs(cfg.algo.num_envs, None), envs(cfg.eval_episodes, 0)


def make_isaaclab_envs(cfg: DictConfig) -> tuple[IsaacLabEnv, IsaacLabEnv]:
    """The Isaac Lab env, twice: Isaac Lab allows one env per process (its simulation context is a singleton),
    so evaluation runs on the training env (the loop restarts the training episodes after it)."""
    from fasttd3_lora.tasks import isaaclab  # looked up at call time: tests swap in a stand-in factory

    task = cfg.task
    try:
        env = isaaclab.make_isaaclab_env(task.name, cfg.algo.num_envs, cfg.seed, cfg.device, task.physics, task.headless)
    except isaaclab.IsaacLabUnavailable as err:
        raise ConfigError(str(err)) from None  # one line, exit 2
    return env, env


def _train_fasttd3(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    from fasttd3_lora.loops.fasttd3 import train_fasttd3  # that module builds on this one's shared pieces

    return train_fasttd3(cfg, run_dir, overrides)


# algo.name -> its training loop; task.family -> (training envs, evaluation envs).
LOOPS: dict[str, Callable[[DictConfig, str | Path, Sequence[str]], Counters]] = {}
ENV_BUILDERS: dict[str, Callable[[DictConfig], tuple[EnvBase, EnvBase]]] = {
    "dmc": make_dmc_envs,
    "isaaclab": make_isaaclab_envs,
}


@dataclasses.dataclass
class Counters:
    """Progress of a run; saved in every checkpoint (plain numbers, so weights_only loads them)."""

    env_step: int = 0
    agent_step: int = 0
    wall_time: float = 0.0  # seconds of training so far, over all resumes
    last_eval_return: float | None = None


def episode_seed(seed: int, env_step: int, stream: int) -> int:
    """Seed for the episodes that start at `env_step` (stream 0: training envs, 1: evaluation envs)."""
    return int(np.random.SeedSequence([seed, stream, env_step]).generate_state(1)[0]) % 2**31


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of `every` lies in (before, after]."""
    return after // every > before // every


class StepEvents(NamedTuple):
    """What the agent step that just ended asks of a training loop."""

    end: bool  # total_env_steps reached
    evaluation: bool  # an eval_every boundary crossed (or the end)
    checkpoint: bool  # a checkpoint_every boundary crossed, an evaluation that keeps its checkpoint, or the end


def advance(counters: Counters, env_steps: int, cfg: DictConfig) -> StepEvents:
    """Count one agent step of `env_steps` simulator steps and say which of the run's events fall in it."""
    before = counters.env_step
    counters.env_step += env_steps
    counters.agent_step += 1
    end = counters.env_step >= cfg.total_env_steps
    evaluation = crossed(before, counters.env_step, cfg.eval_every) or end
    checkpoint = crossed(before, counters.env_step, cfg.checkpoint_every) or (evaluation and cfg.keep_eval_checkpoints)
    return StepEvents(end, evaluation, checkpoint or end)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def start_episodes(env: EnvBase, seed: int, env_step: int) -> TensorDict:
    """Reset every env from the seed of this step; returns the reset TensorDict (first observations)."""
    env.set_seed(episode_seed(seed, env_step, stream=0))
    return env.reset()


@torch.no_grad()
def evaluate(agent: Agent, env: EnvBase, seed: int) -> tuple[float, float]:
    """One deterministic episode per eval env (DESIGN §5: 10); mean and std of the returns."""
    env.set_seed(seed)
    td = env.reset()
    returns = torch.zeros(env.batch_size)
    running = torch.ones(env.batch_size, dtype=torch.bool)
    while bool(running.any()):
        td.set("action", agent.act(td["observation"], deterministic=True).cpu())
        td, next_td = env.step_and_maybe_reset(td)
        returns += td["next", "reward"][:, 0] * running
        running &= ~td["next", "done"][:, 0]
        td = next_td
    return returns.mean().item(), returns.std(correction=0).item()


class UpdateMetrics:
    """Running sums of the agents' update metrics between log rows; the non-finite guard for losses and Q."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.total: Tensor | None = None
        self.count = 0

    def add(self, updates: list[dict[str, Tensor]], env_step: int, num_updates: int) -> None:
        self.keys = list(updates[0])
        ref = updates[0][self.keys[0]]
        values = torch.stack([torch.stack([m[k].to(ref.device, torch.float32) for k in self.keys]) for m in updates])
        if not bool(torch.isfinite(values).all()):  # one host sync per agent step
            u, k = (~torch.isfinite(values)).nonzero()[0].tolist()
            update = num_updates - len(updates) + u + 1
            raise NonFiniteError(f"non-finite {self.keys[k]} ({values[u, k].item()}) at env_step {env_step} (update {update})")
        step_total = values.sum(0)
        self.total = step_total if self.total is None else self.total + step_total
        self.count += len(updates)

    def pop_means(self) -> dict[str, float]:
        if self.total is None:
            return {}
        means = dict(zip(self.keys, (self.total / self.count).tolist(), strict=True))
        self.total, self.count = None, 0
        return means


def checkpoint_state(
    cfg: dict[str, Any],
    overrides: Sequence[str],
    counters: Counters,
    agent: Agent,
    replay: ReplayBuffer | NStepReplayBuffer | None,
    generator: torch.Generator,
    env_facts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything an exact resume needs, as plain containers and tensors (docs/training.md, "Checkpoints");
    `env_facts` (`export.env_deploy_facts` of the training env) lets export run without rebuilding the env."""
    agent_state = agent.state_dict()
    bad = find_nonfinite(agent_state)
    if bad is not None:
        raise NonFiniteError(f"non-finite agent state {bad} at env_step {counters.env_step}")
    meta = {"config": cfg, "overrides": list(overrides), "counters": dataclasses.asdict(counters)}
    if env_facts is not None:
        meta["env"] = env_facts
    return {
        "meta": meta,
        "agent": agent_state,
        "replay": None if replay is None else replay.state_dict(),
        "rng": capture_rng(generator),
    }


@dataclasses.dataclass
class StopGuard:
    """What a training loop's stop messages need: the loop sets `checkpoint_step` after each checkpoint it writes;
    `write_nonfinite` is False on the ranks that do not write files (DDP)."""

    run_dir: Path
    resolved: dict[str, Any]
    counters: Counters
    agent: Any
    progress: Progress
    checkpoint_step: int
    write_nonfinite: bool = True


@contextlib.contextmanager
def reported_stops(guard: StopGuard) -> Iterator[StopGuard]:
    """Around a training loop (both algorithms): a non-finite stop writes the offending agent to
    checkpoints/nonfinite.pt and names the last finite checkpoint; Ctrl-C says how to resume; a finished loop
    prints its last line."""
    ckpt_dir, counters = guard.run_dir / CHECKPOINT_DIR, guard.counters
    try:
        yield guard
    except NonFiniteError as err:
        nonfinite = ckpt_dir / "nonfinite.pt"
        if guard.write_nonfinite:
            save_checkpoint(nonfinite, {"meta": {"config": guard.resolved, "counters": dataclasses.asdict(counters)},
                                        "agent": guard.agent.state_dict()})  # fmt: skip
        raise NonFiniteError(
            f"{err}: run stopped; last finite checkpoint {ckpt_dir / LATEST} (env_step {guard.checkpoint_step}), "
            f"the non-finite agent in {nonfinite}"
        ) from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted at env_step {counters.env_step}; resume=`{guard.run_dir}` continues from env_step "
            f"{guard.checkpoint_step}"
        ) from None
    final = f" | last eval return {counters.last_eval_return:.1f}" if counters.last_eval_return is not None else ""
    guard.progress.write(f"done: env_step {counters.env_step}{final} | run dir {guard.run_dir}")


def train(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one training run writing into `run_dir`; returns the final counters.

    `overrides` are the command-line overrides that produced `cfg`; checkpoints store them so that
    `resume=<run dir>` rebuilds the same config. Dispatches on `cfg.algo.name` (`LOOPS`)."""
    if cfg.algo.name == "sac" and cfg.task.family != "dmc":
        raise ConfigError(f"task.family={cfg.task.family!r}: SAC runs dmc tasks only; use algo=fasttd3")
    check_device(cfg.device)  # multirun jobs and direct callers reach here without the command-line check
    threads, why = apply_threads(cfg.threads)
    print(f"torch threads: {threads} ({why})", flush=True)
    with open_dict(cfg):
        cfg.threads = threads  # the count goes into config.yaml and checkpoints: a resume reuses it
    # <run dir>/status.json records how the run ended (fasttd3_lora/run_status.py); the report reads it.
    with recording_outcome(run_dir, NonFiniteError, (ConfigError, CheckpointError)) as outcome:
        try:
            counters = LOOPS[cfg.algo.name](cfg, run_dir, overrides)
        except ReplayMemoryError as err:  # known only once the env says how big a transition is
            raise ConfigError(f"algo.buffer_size={cfg.algo.buffer_size}: {err}") from None
        outcome["env_step"] = counters.env_step
    return counters


def train_sac(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """The SAC loop of `train` (module docstring)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    algo = cfg.algo
    resolved = OmegaConf.to_container(cfg, resolve=True)
    device = torch.device(cfg.device)
    env_steps_per_agent_step = algo.num_envs * algo.action_repeat
    total_agent_steps = math.ceil(cfg.total_env_steps / env_steps_per_agent_step)
    # Updates follow every agent step after the first learning_starts (SimbaV2); the LR schedule spans them all.
    total_updates = max(1, (total_agent_steps - algo.learning_starts) * algo.updates_per_step)
    resume = load_checkpoint(resolve_checkpoint(cfg.resume)) if cfg.resume else None
    if resume is not None:
        check_resume_compatible(resolved, resume["meta"]["config"])
    resumed = resume is not None

    seed_everything(cfg.seed)  # network weights are drawn from torch's global RNG
    generator = torch.Generator(device).manual_seed(cfg.seed)  # actions, noise and replay sampling
    with ExitStack() as stack:
        env, eval_env = ENV_BUILDERS[cfg.task.family](cfg)
        stack.callback(env.close)
        stack.callback(eval_env.close)
        obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
        agent, replay = build_sac(cfg, obs_dim, act_dim, total_updates, device, generator)
        env_facts = env_deploy_facts(env)
        counters, updates_from = Counters(), algo.learning_starts
        if resume is not None:
            counters = Counters(**resume["meta"]["counters"])
            agent.load_state_dict(resume["agent"])
            if resume["replay"] is not None:
                replay.load_state_dict(resume["replay"])
            else:  # a checkpoint without its buffer: refill learning_starts agent steps before updating again
                updates_from = counters.agent_step + algo.learning_starts
            restore_rng(resume["rng"], generator)
            del resume  # the buffer now lives in `replay`: free the loaded copy

        atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(resolved).encode()))
        wandb = OmegaConf.to_container(cfg.wandb) if cfg.logger == "wandb" else None
        logger = RunLogger(run_dir, config=resolved, wandb=wandb,
                           resumed_at=counters.env_step if resumed else None)
        stack.callback(logger.close)
        progress = Progress(cfg.total_env_steps, counters.env_step)
        stack.callback(progress.close)
        progress.update(counters.env_step, eval_return=counters.last_eval_return)
        how = f"resumed at env_step {counters.env_step}" if resumed else "started"
        progress.write(f"{how}: {cfg.task.name}, {algo.name} with a {cfg.critic.kind} critic, run dir {run_dir}")

        start_time, start_wall = time.monotonic(), counters.wall_time

        def wall_time() -> float:
            return start_wall + time.monotonic() - start_time

        def save(path: Path, with_replay: bool) -> None:
            counters.wall_time = wall_time()
            state = checkpoint_state(
                resolved, overrides, counters, agent, replay if with_replay else None, generator, env_facts
            )
            save_checkpoint(path, state)

        if counters.env_step == 0:
            save(ckpt_dir / LATEST, cfg.save_buffer)  # the guard's last finite state exists from the start
        num_envs = algo.num_envs
        obs = start_episodes(env, cfg.seed, counters.env_step)["observation"]
        episode_return = torch.zeros(num_envs)
        metrics = UpdateMetrics()
        row_step, row_time = counters.env_step, time.monotonic()
        with reported_stops(StopGuard(run_dir, resolved, counters, agent, progress, counters.env_step)) as guard:
            while counters.env_step < cfg.total_env_steps:
                # 1. act and step
                if counters.agent_step < algo.learning_starts:
                    action = torch.rand((num_envs, act_dim), generator=generator, device=generator.device) * 2 - 1
                else:
                    action = agent.act(obs)
                td = TensorDict({"observation": obs, "action": action.cpu()}, batch_size=[num_envs])
                td, next_td = env.step_and_maybe_reset(td)
                end, evaluation, checkpoint = advance(counters, env_steps_per_agent_step, cfg)

                # 2. store; a checkpoint ends every episode (a time-out, so the target bootstraps)
                nxt = td["next"]
                reward, done = nxt["reward"][:, 0], nxt["done"][:, 0]
                truncated = nxt["truncated"][:, 0] | checkpoint
                replay.add(
                    TensorDict(
                        {
                            "observation": obs,
                            "action": td["action"],
                            "reward": reward,
                            "next_observation": nxt["observation"],
                            "terminated": nxt["terminated"][:, 0],
                            "truncated": truncated,
                        },
                        batch_size=[num_envs],
                    )
                )
                agent.record(nxt["observation"], reward, done | truncated)
                obs = next_td["observation"]

                # 3. learn
                if counters.agent_step > updates_from:
                    batches = [agent.update(replay.sample(algo.batch_size, generator)) for _ in range(algo.updates_per_step)]
                    metrics.add(batches, counters.env_step, agent.num_updates)

                # 4. report finished episodes (episodes cut by a checkpoint are not reported)
                episode_return += reward
                if bool(done.any()):
                    now = time.monotonic()
                    sps = (counters.env_step - row_step) / max(now - row_time, 1e-9)
                    row_step, row_time = counters.env_step, now
                    row = {"episode_return": episode_return[done].mean().item(), "sps": sps, **metrics.pop_means()}
                    logger.log(counters.env_step, wall_time(), row)
                episode_return[done] = 0.0

                # 5. evaluate, checkpoint (their time is left out of SPS)
                paused = time.monotonic()
                if evaluation:
                    seed = episode_seed(cfg.seed, counters.env_step, stream=1)
                    mean, std = evaluate(agent, eval_env, seed)
                    counters.last_eval_return = mean
                    logger.log(counters.env_step, wall_time(), {"eval_return": mean, "eval_return_std": std})
                    progress.update(counters.env_step, eval_return=mean)
                if checkpoint:
                    save(ckpt_dir / LATEST, cfg.save_buffer)
                    guard.checkpoint_step = counters.env_step
                    if evaluation and cfg.keep_eval_checkpoints:
                        copy_checkpoint(ckpt_dir / LATEST, ckpt_dir / f"step_{counters.env_step}.pt")
                    if not end:
                        obs = start_episodes(env, cfg.seed, counters.env_step)["observation"]
                        episode_return.zero_()
                row_time += time.monotonic() - paused
                progress.update(counters.env_step)
    return counters


LOOPS.update(sac=train_sac, fasttd3=_train_fasttd3)
if set(LOOPS) != set(ALGORITHMS) or set(ENV_BUILDERS) != set(TASK_FAMILIES):
    raise ImportError("fasttd3_lora.train's builders and fasttd3_lora.config's ALGORITHMS / TASK_FAMILIES disagree")


# ---------------------------------------------------------------------------------------------- command line


def _fail(code: int, err: BaseException) -> NoReturn:
    print(f"fasttd3-train: {err}", file=sys.stderr, flush=True)
    sys.exit(code)


def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _fresh_dir(path: Path) -> Path:
    """`path`, or `path_2`, `path_3`, ... if it exists: a new run never writes into another run's directory."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}_{n}")
    return candidate


def prepare_command_line(argv: Sequence[str]) -> list[str]:
    """Check the command line and return the one Hydra runs: a resumed run gets its original overrides (the new
    ones win) and its own run directory; a new run a directory that does not exist yet.

    Raises `ConfigError` / `CheckpointError` (one line). Hydra's informational modes (--help, --cfg, ...) and
    other config directories pass through unchecked."""
    args = get_args_parser().parse_args(list(argv))
    if any((args.help, args.hydra_help, args.cfg, args.info, args.shell_completion, args.config_path,
            args.config_name, args.config_dir, args.experimental_rerun)):  # fmt: skip
        return list(argv)
    resume = override_value(args.overrides, "resume")
    if args.multirun:  # every job is validated when it starts; the sweep gets a directory of its own
        check_overrides(args.overrides)
        if resume is not None:
            raise ConfigError(f"resume={resume}: not allowed with --multirun (resume each run on its own)")
        # hydra/launcher=... selects the group that hydra.launcher.* keys then override: keep both
        hydra_overrides = [o for o in args.overrides if o.startswith(("hydra.", "hydra/"))]
        sweep_dir = _fresh_dir(Path(compose_config(hydra_overrides, check=False, with_hydra=True).hydra.sweep.dir))
        return [*argv, f"hydra.sweep.dir={_quote(str(sweep_dir))}"]
    overrides, run_dir, saved = list(args.overrides), None, None
    if resume is not None:
        checkpoint = resolve_checkpoint(str(resume))
        saved = load_checkpoint(checkpoint, mmap=True)["meta"]  # mmap: the replay buffer is not read here
        overrides = merge_overrides(saved["overrides"], overrides)
        run_dir = run_dir_of(checkpoint)
    cfg = compose_config(overrides, with_hydra=True)
    template = Path(cfg.hydra.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    check_device(cfg.device)
    if saved is not None:
        check_resume_compatible(OmegaConf.to_container(cfg, resolve=True), saved["config"])
        if override_value(overrides, "threads") is None and isinstance(saved["config"].get("threads"), int):
            # bit-exact resume needs the same thread count (reductions split differently)
            overrides.append(f"threads={saved['config']['threads']}")
    run_dir = run_dir or _fresh_dir(template)
    return [*overrides, f"hydra.run.dir={_quote(str(run_dir))}"]


@hydra.main(config_path="pkg://fasttd3_lora.configs", config_name="config", version_base="1.3")
def _hydra_job(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        validate_config(cfg)  # multirun jobs reach here unchecked
        train(cfg, hydra_cfg.runtime.output_dir, drop_override(list(hydra_cfg.overrides.task), "resume"))
    except (ConfigError, CheckpointError, NonFiniteError) as err:
        code = EXIT_NONFINITE if isinstance(err, NonFiniteError) else EXIT_CONFIG
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # A failed job must not end the sweep: Hydra records the exception, runs the remaining jobs, then
            # re-raises the first failure (exit status 1). The run's status.json keeps the reason.
            print(f"fasttd3-train: {err}", file=sys.stderr, flush=True)
            if read_status(hydra_cfg.runtime.output_dir) is None:  # refused before train() started
                write_status(hydra_cfg.runtime.output_dir, "error", str(err))
            raise
        _fail(code, err)
    except KeyboardInterrupt as err:
        _fail(EXIT_INTERRUPTED, err)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point (`fasttd3-train`, `python -m fasttd3_lora.train`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = prepare_command_line(argv)
    except (ConfigError, CheckpointError) as err:
        _fail(EXIT_CONFIG, err)
    if int(os.environ.get("RANK", "0")) > 0:
        # torchrun: rank 0 owns the run directory (and names it); the other ranks write nothing there, and a
        # directory of their own keeps Hydra's files from racing rank 0's (docs/fasttd3.md, "Multi-GPU").
        scratch = tempfile.mkdtemp(prefix=f"fasttd3-rank{os.environ['RANK']}-")
        argv = [*drop_override(argv, "hydra.run.dir"), f"hydra.run.dir={_quote(scratch)}"]
    sys.argv = [sys.argv[0], *argv]  # Hydra reads its command line from sys.argv
    _hydra_job()


if __name__ == "__main__":
    main()
