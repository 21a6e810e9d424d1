"""The PPO loop (`python -m fasttd3_lora.train algo=ppo ...`; DESIGN §10, docs/ppo.md):

    every iteration           a rollout of num_steps agent steps on every env (actions sampled, clipped to
                              [-1, 1] at the env), GAE over it, then num_epochs x num_minibatches updates; the
                              finished episodes' returns and the update's means are one metrics row
    every eval_every          deterministic episodes (DMC: separate envs, per task for a library run; Isaac
                              Lab: the training env, after which the training episodes restart)
    every checkpoint_every    checkpoints/latest.pt at the end of the iteration with the running episodes
                              (dm_control), or, where the envs cannot save them, after which every training
                              episode restarts: the rollout's last step is a time-out (it bootstraps), as in the
                              other loops (exact resume either way, `fasttd3_lora.loops.kit`)

A policy library run (`library.path`) builds the policy from the library's base with one LoRA adapter per task
(`library.tasks`; the envs split evenly among them, each row of a batch using its env's adapter) or, with
`library.rank=full`, fine-tunes every weight of one copy; the observation statistics stay the base's. When the run
reaches its budget, each task's adapter goes into the library with its last evaluation return. Events are checked
once per iteration, so a run ends at the first iteration end at or after total_env_steps.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor

from fasttd3_lora.envs import EnvRequest, env_deploy_facts, make_envs
from fasttd3_lora.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from fasttd3_lora.library_store import (
    INDEX,
    Library,
    LibraryError,
    adapter_tensors,
    attach_adapters,
    base_networks,
    create_library,
)
from fasttd3_lora.checks import ConfigError
from fasttd3_lora.loops.kit import (
    Counters,
    EpisodeReturns,
    RunRecord,
    UpdateMetrics,
    advance,
    continue_episodes,
    episode_seed,
    load_resume,
    reported_stops,
    restore_on_policy,
    in_progress,
    saves_episodes,
    seed_everything,
)
from fasttd3_lora.mlp_policy import GaussianPolicy, ValueFunction
from fasttd3_lora.normalization import RunningMeanStd
from fasttd3_lora.ppo import PPO, PPOConfig, gae

__all__ = ["build", "run"]


def build(pcfg: PPOConfig, obs_dim: int, act_dim: int, device: torch.device, generator: torch.Generator,
          library: Library | None = None) -> PPO:  # fmt: skip
    """The agent: fresh networks, or the library's base with adapters (or a full copy) for `pcfg.library_tasks`."""
    if library is None:
        policy = GaussianPolicy(obs_dim, act_dim, pcfg.actor_hidden_dims, pcfg.init_std)
        value = ValueFunction(obs_dim, pcfg.critic_hidden_dims)
        return PPO(pcfg, policy, value, RunningMeanStd(obs_dim), device, generator)
    policy, value, obs_rms = base_networks(library, pcfg.num_tasks, obs_dim, act_dim)
    if pcfg.library_rank is not None:
        attach_adapters(policy, pcfg.library_rank, pcfg.num_tasks, pcfg.library_alpha)
    return PPO(pcfg, policy, value, obs_rms, device, generator, frozen_obs_stats=True)


def _open_library(pcfg: PPOConfig) -> Library | None:
    """The run's library; with `library.base`, created from that PPO run if it does not exist yet."""
    if not pcfg.has_library:
        return None
    try:
        if pcfg.library_base is not None and not (Path(pcfg.library_path) / INDEX).is_file():
            create_library(pcfg.library_path, load_checkpoint(resolve_checkpoint(pcfg.library_base)), pcfg.library_base)
        return Library(pcfg.library_path)
    except (LibraryError, CheckpointError) as err:
        raise ConfigError(f"library.path={pcfg.library_path}: {err}") from None


def _per_task(values: Tensor, task_ids: Tensor | None, names: Sequence[str], key: str) -> dict[str, float]:
    """`{key/<task>: mean of that task's rows}` for a multi-task env (nothing for one task)."""
    if task_ids is None:
        return {}
    ids = task_ids.to(values.device)
    return {f"{key}/{name}": values[ids == k].mean().item() for k, name in enumerate(names) if bool((ids == k).any())}


def run(cfg: DictConfig, pcfg: PPOConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one PPO run writing into `run_dir` (see the module docstring)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    device = torch.device(cfg.device)
    num_envs, num_steps = pcfg.num_envs, pcfg.num_steps
    env_steps_per_iteration = num_envs * num_steps * pcfg.action_repeat
    resume = load_resume(cfg, resolved)
    library = _open_library(pcfg)

    seed_everything(cfg.seed)  # network weights are drawn from torch's global RNG
    generator = torch.Generator(device).manual_seed(cfg.seed)  # actions and minibatch order
    with ExitStack() as stack:
        env, eval_env = make_envs(EnvRequest.of_run(cfg, num_envs, pcfg.action_repeat, cfg.seed, cfg.device,
                                                    tasks=pcfg.library_tasks))  # fmt: skip
        stack.callback(env.close)
        shares_env = eval_env is env  # Isaac Lab: one env per process
        if not shares_env:
            stack.callback(eval_env.close)
        obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
        try:
            agent = build(pcfg, obs_dim, act_dim, device, generator, library)
        except LibraryError as err:
            raise ConfigError(f"library.path={pcfg.library_path}: {err}") from None
        env_facts = env_deploy_facts(env)
        counters = Counters() if resume is None else restore_on_policy(resume, agent, generator)
        record = RunRecord(stack, cfg, resolved, run_dir, overrides, counters, resumed=resume is not None)
        saved_progress = None if resume is None else resume.get("in_progress")
        del resume
        tasks = pcfg.library_tasks or (str(cfg.task.name),)
        learner = "" if library is None else (
            f", library {library.path} ({'full fine-tuning' if pcfg.library_rank is None else f'rank-{pcfg.library_rank} adapters'}"
            f" for {len(tasks)} task(s), {agent.policy_trainable_numel():,} trainable policy numbers)")  # fmt: skip
        record.announce(f"{','.join(tasks)}, ppo{learner}, {num_envs} envs")

        keeps_episodes = saves_episodes(env)

        def checkpoint(keep_copy: bool = False) -> None:  # between iterations: no metrics are pending
            progress = in_progress(env, keeps_episodes, episode_return) if counters.env_step else None
            record.checkpoint(agent, None, generator, env_facts, keep_copy=keep_copy, progress=progress)

        episode_return = EpisodeReturns(num_envs, env.device)
        if counters.env_step == 0:
            checkpoint()  # the guard's last finite state exists from the start
        task_ids = getattr(env, "task_ids", None)
        task = None if task_ids is None else task_ids.to(device)
        obs = continue_episodes(env, saved_progress, cfg.seed, counters.env_step, episode_return)["observation"]
        metrics = UpdateMetrics()
        row_step, row_time = counters.env_step, time.monotonic()
        last_eval: dict[str, float] = {}
        with reported_stops(record.guard(agent)):
            while counters.env_step < cfg.total_env_steps:
                # 1. a rollout of num_steps agent steps on every env
                steps, finished, finished_tasks = [], [], []
                for _ in range(num_steps):
                    out = agent.explore(obs, task)
                    td = TensorDict({"observation": obs, "action": out["action"].clamp(-1.0, 1.0).to(env.device)},
                                    batch_size=[num_envs])  # fmt: skip
                    td, next_td = env.step_and_maybe_reset(td)
                    nxt = td["next"]
                    out["reward"] = nxt["reward"].squeeze(-1).to(device)
                    out["terminated"] = nxt["terminated"].squeeze(-1).to(device)
                    out["done"] = nxt["done"].squeeze(-1).to(device)
                    agent.observe_rewards(out["reward"], out["done"])
                    out["next_observation"] = nxt["observation"].to(device)  # the true final one at an end
                    steps.append(out)
                    ended = episode_return.add(nxt["reward"].squeeze(-1), nxt["done"].squeeze(-1))
                    if ended is not None:  # (not the episodes cut by a restart or a spread start)
                        finished.append(ended[0])
                        if task_ids is not None:
                            finished_tasks.append(task_ids[ended[1].cpu()])
                    obs = next_td["observation"]
                end, evaluation, checkpoint_due = advance(counters, env_steps_per_iteration, cfg)
                # Episodes restart after a checkpoint that cannot keep them (exact resume), and on Isaac Lab after
                # an evaluation.
                cut = checkpoint_due and not keeps_episodes
                restart = (cut or (evaluation and shares_env)) and not end

                # 2. advantages (a restart ends every episode as a time-out: it bootstraps), then the update
                rollout = torch.stack(steps)  # (T, N)
                if restart:
                    rollout["done"][-1] = True
                next_values = agent.bootstrap_values(rollout["next_observation"].flatten(0, 1),
                                                     None if task is None else task.repeat(num_steps))  # fmt: skip
                rollout["advantage"], rollout["return"] = gae(
                    agent.scaled_rewards(rollout["reward"]), rollout["value"], next_values.view(num_steps, num_envs), rollout["terminated"],
                    rollout["done"], pcfg.gamma, pcfg.gae_lambda)  # fmt: skip
                flat = rollout.exclude("next_observation", "reward", "terminated", "done").reshape(-1)
                if task is not None:
                    flat["task"] = task.repeat(num_steps)
                metrics.add([agent.update(flat)], counters.env_step, agent.num_updates)

                # 3. one metrics row per iteration
                now = time.monotonic()
                row = {"sps": (counters.env_step - row_step) / max(now - row_time, 1e-9), **metrics.pop_means()}
                row_step, row_time = counters.env_step, now
                returns = torch.cat(finished) if finished else torch.zeros(0)
                if len(returns):
                    row["episode_return"] = returns.mean().item()
                    if finished_tasks:
                        row.update(_per_task(returns, torch.cat(finished_tasks), tasks, "episode_return"))
                record.log(row)

                # 4. evaluate, checkpoint (their time is left out of SPS)
                paused = time.monotonic()
                if evaluation:
                    eval_seed = episode_seed(cfg.seed, counters.env_step, stream=1)
                    returns = record.evaluate(agent, eval_env, eval_seed)
                    last_eval = _per_task(returns, getattr(eval_env, "task_ids", None), tasks, "eval_return")
                    if last_eval:
                        record.log(last_eval)
                if checkpoint_due:
                    checkpoint(keep_copy=evaluation and cfg.keep_eval_checkpoints)
                if restart:
                    obs = episode_return.restart(env, cfg.seed, counters.env_step)["observation"]
                row_time += time.monotonic() - paused
                record.progress.update(counters.env_step)
        if library is not None and pcfg.library_rank is not None and counters.env_step >= cfg.total_env_steps:
            _add_to_library(library, agent, pcfg, tasks, last_eval, counters, run_dir, cfg)
            record.progress.write(f"library {library.path}: added the adapters of {', '.join(tasks)}")
    return counters


def _add_to_library(library: Library, agent: PPO, pcfg: PPOConfig, tasks: Sequence[str], last_eval: dict[str, float],
                    counters: Counters, run_dir: str | Path, cfg: DictConfig) -> None:  # fmt: skip
    """Each task's adapter, with what the run knows of it, into the library."""
    for k, name in enumerate(tasks):
        eval_return = last_eval.get(f"eval_return/{name}", counters.last_eval_return if len(tasks) == 1 else None)
        library.add_adapter(name, adapter_tensors(agent.policy, k), {
            "rank": pcfg.library_rank, "alpha": pcfg.library_alpha or float(pcfg.library_rank),
            "eval_return": eval_return, "env_step": counters.env_step // len(tasks), "run": str(Path(run_dir).resolve()),
            "seed": int(cfg.seed), "tasks_in_run": list(tasks),
        })  # fmt: skip
