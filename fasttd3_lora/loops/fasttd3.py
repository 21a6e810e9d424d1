"""The FastTD3 loop of the training app (`python -m fasttd3_lora.train algo=fasttd3 ...`; docs/fasttd3.md).

    every agent step          act on all envs at once (each env with its own exploration noise scale), step them,
                              store the step (true final observations at episode ends when the env has them),
                              re-draw the noise scale of the envs whose episode ended, then updates_per_step
                              updates (the actor every policy_frequency-th); a non-finite loss or Q stops the run
    every eval_every          deterministic episodes (DMC: separate envs; Isaac Lab: the training env, after
                              which the training episodes restart)
    every checkpoint_every    checkpoints/latest.pt, then every training episode restarts

Run directory, metrics, evaluation, checkpoints, exact resume and the non-finite guard are the SAC loop's
(`fasttd3_lora.train`): the same pieces, imported. Under torchrun (`fasttd3_lora.distributed`) every rank runs
this loop on its own envs and buffer; env steps count all ranks; rank 0 alone logs, evaluates and writes
checkpoints (without the replay buffers, so a multi-process resume refills them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tensordict import TensorDict
from torch import Tensor

from fasttd3_lora.checkpoint import (
    CHECKPOINT_DIR,
    LATEST,
    atomic_write,
    copy_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng,
    save_checkpoint,
)
from fasttd3_lora.config import check_resume_compatible
from fasttd3_lora.distributed import Distributed, init_from_env, rank_seed
from fasttd3_lora.export import env_deploy_facts
from fasttd3_lora.fasttd3 import FastTD3, FastTD3Config
from fasttd3_lora.replay import NStepReplayBuffer
from fasttd3_lora.run_logging import Progress, RunLogger
from fasttd3_lora.train import (
    ENV_BUILDERS,
    Counters,
    StopGuard,
    UpdateMetrics,
    advance,
    checkpoint_state,
    episode_seed,
    evaluate,
    reported_stops,
    seed_everything,
    start_episodes,
)

__all__ = ["build_fasttd3", "train_fasttd3"]

OBS_KEYS = ("observation", "critic_observation")


def build_fasttd3(
    fcfg: FastTD3Config,
    env: Any,
    total_updates: int,
    device: torch.device,
    generator: torch.Generator,
    ddp: Distributed | None,
) -> tuple[FastTD3, NStepReplayBuffer]:
    """The agent and its per-env n-step buffer for `env` (asymmetric when the env has critic observations)."""
    spec = env.observation_spec
    obs_dim, act_dim = int(spec["observation"].shape[-1]), int(env.action_spec.shape[-1])
    critic_dim = int(spec["critic_observation"].shape[-1]) if "critic_observation" in spec.keys() else None
    agent = FastTD3(fcfg, obs_dim, act_dim, critic_dim, fcfg.num_envs, total_updates, device, generator,
                    grad_sync=None if ddp is None else ddp.average_grads)  # fmt: skip
    if ddp is not None:
        ddp.broadcast_([agent.actor, agent.critic, agent.target_critic])
    replay = NStepReplayBuffer(fcfg.num_envs, fcfg.buffer_size, obs_dim, act_dim, n_step=fcfg.n_step,
                               gamma=fcfg.gamma, critic_obs_dim=critic_dim, device=device)  # fmt: skip
    return agent, replay


class _Deterministic:
    """FastTD3's noiseless policy with the `act(obs, deterministic=True)` face `train.evaluate` calls."""

    def __init__(self, agent: FastTD3) -> None:
        self.agent = agent

    def act(self, obs: Tensor, deterministic: bool = True) -> Tensor:
        return self.agent.act(obs, explore=not deterministic)


class _Silent:
    """Stands in for the logger and the progress display on ranks other than 0."""

    def log(self, *args: Any, **kwargs: Any) -> None: ...
    def update(self, *args: Any, **kwargs: Any) -> None: ...
    def write(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


def _observations(td: TensorDict) -> TensorDict:
    return td.select(*(k for k in OBS_KEYS if k in td.keys()))


def train_fasttd3(cfg: DictConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one FastTD3 run writing into `run_dir` (see the module docstring)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / CHECKPOINT_DIR
    fcfg = FastTD3Config.from_hydra(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ddp = init_from_env(cfg.device)
    rank, world = (0, 1) if ddp is None else (ddp.rank, ddp.world_size)
    lead = rank == 0
    device = torch.device(cfg.device) if ddp is None else ddp.device
    num_envs = fcfg.num_envs
    env_steps_per_agent_step = num_envs * fcfg.action_repeat * world  # env steps count every rank's envs
    total_agent_steps = math.ceil(cfg.total_env_steps / env_steps_per_agent_step)
    total_updates = max(1, (total_agent_steps - fcfg.learning_starts) * fcfg.updates_per_step)
    resume = load_checkpoint(resolve_checkpoint(cfg.resume)) if cfg.resume else None
    if resume is not None:
        check_resume_compatible(resolved, resume["meta"]["config"])
    resumed = resume is not None

    seed = rank_seed(cfg.seed, rank)  # this rank's envs and random draws
    seed_everything(cfg.seed)  # network weights: the same on every rank (and broadcast from rank 0)
    generator = torch.Generator(device).manual_seed(seed)
    env_cfg = cfg.copy()  # the env builders read these keys; a task family's task.fasttd3 may set num_envs
    with open_dict(env_cfg):
        env_cfg.seed, env_cfg.device, env_cfg.algo.num_envs = seed, str(device), num_envs
    with ExitStack() as stack:
        if ddp is not None:
            stack.callback(ddp.close)
        env, eval_env = ENV_BUILDERS[cfg.task.family](env_cfg)
        stack.callback(env.close)
        shares_env = eval_env is env  # Isaac Lab: one env per process
        if not shares_env:
            stack.callback(eval_env.close)
        agent, replay = build_fasttd3(fcfg, env, total_updates, device, generator, ddp)
        env_facts = env_deploy_facts(env)
        counters, updates_from = Counters(), fcfg.learning_starts
        if resume is not None:
            counters = Counters(**resume["meta"]["counters"])
            agent.load_state_dict(resume["agent"])
            if resume["replay"] is not None and world == 1:
                replay.load_state_dict(resume["replay"])
                restore_rng(resume["rng"], generator)
            else:  # without its buffer: refill learning_starts agent steps before updating again
                updates_from = counters.agent_step + fcfg.learning_starts
            del resume

        logger: RunLogger | _Silent = _Silent()
        progress: Progress | _Silent = _Silent()
        if lead:
            atomic_write(run_dir / "config.yaml", lambda f: f.write(OmegaConf.to_yaml(resolved).encode()))
            wandb = OmegaConf.to_container(cfg.wandb) if cfg.logger == "wandb" else None
            logger = RunLogger(run_dir, config=resolved, wandb=wandb,
                               resumed_at=counters.env_step if resumed else None)
            progress = Progress(cfg.total_env_steps, counters.env_step)
        stack.callback(logger.close)
        stack.callback(progress.close)
        progress.update(counters.env_step, eval_return=counters.last_eval_return)
        how = f"resumed at env_step {counters.env_step}" if resumed else "started"
        progress.write(f"{how}: {cfg.task.name}, fasttd3 with a {cfg.critic.kind} critic, {num_envs} envs x "
                       f"{world} process(es), run dir {run_dir}")  # fmt: skip
        # DMC episodes last max_episode_steps env steps in every env at once; a checkpoint restarts them all.
        episode_round = num_envs * world * cfg.task.max_episode_steps
        if cfg.task.family == "dmc" and cfg.checkpoint_every % episode_round:
            progress.write(f"note: checkpoint_every={cfg.checkpoint_every} cuts training episodes short (each "
                           f"checkpoint restarts them); a multiple of {episode_round} (envs x episode) does not")  # fmt: skip

        start_time, start_wall = time.monotonic(), counters.wall_time

        def wall_time() -> float:
            return start_wall + time.monotonic() - start_time

        def save(path: Path, with_replay: bool) -> None:
            counters.wall_time = wall_time()
            keep = replay if with_replay and world == 1 else None
            state = checkpoint_state(resolved, overrides, counters, agent, keep, generator, env_facts)
            if lead:
                save_checkpoint(path, state)
            # Every rank continues from what was saved, as a resumed run does (train.train_sac explains why):
            # the replicas stay identical.
            agent.load_state_dict(state["agent"])

        if counters.env_step == 0:
            save(ckpt_dir / LATEST, cfg.save_buffer)  # the guard's last finite state exists from the start
        current = _observations(start_episodes(env, seed, counters.env_step))
        episode_return = torch.zeros(num_envs, device=env.device)
        critic_metrics, actor_metrics = UpdateMetrics(), UpdateMetrics()
        row_step, row_time = counters.env_step, time.monotonic()
        guard = StopGuard(run_dir, resolved, counters, agent, progress, counters.env_step, write_nonfinite=lead)
        with reported_stops(guard):
            while counters.env_step < cfg.total_env_steps:
                # 1. act (every env with its own noise scale) and step all envs at once
                action = agent.act(current["observation"])
                td = current.clone(recurse=False)
                td.set("action", action.to(env.device))
                td, next_td = env.step_and_maybe_reset(td)
                end, evaluation, checkpoint = advance(counters, env_steps_per_agent_step, cfg)
                # Episodes restart after a checkpoint (exact resume), and on Isaac Lab after rank 0's evaluation.
                restart = checkpoint or (evaluation and shares_env and lead)

                # 2. store: ("next", obs) is the true final observation where the env gives one; a restart ends
                # every episode as a time-out (it bootstraps)
                nxt = td["next"]
                reward, terminated = nxt["reward"][:, 0], nxt["terminated"][:, 0]
                truncated = nxt["truncated"][:, 0] | restart
                step = {"action": td["action"], "reward": reward, "terminated": terminated, "truncated": truncated}
                for key in current.keys():
                    step[key], step[f"next_{key}"] = current[key], nxt[key]
                replay.add(TensorDict(step, batch_size=[num_envs], device=env.device))
                record = {key: nxt[key] for key in current.keys()}
                if ddp is not None:  # identical normaliser statistics on every rank: all ranks' observations
                    record = {key: ddp.gather_rows(value) for key, value in record.items()}
                agent.record(record["observation"], record.get("critic_observation"))
                ended = terminated | truncated
                agent.on_episode_end(ended)  # re-draw those envs' exploration noise scale
                current = _observations(next_td)

                # 3. learn: updates_per_step updates on this rank's batches, gradients averaged over ranks
                if counters.agent_step > updates_from:
                    updates = []
                    for _ in range(fcfg.updates_per_step):
                        batch = replay.sample(fcfg.batch_size, generator)
                        updates.append(agent.update(batch, agent.actor_update_due()))
                    critic_part = [{k: v for k, v in m.items() if k != "actor_loss"} for m in updates]
                    actor_part = [{"actor_loss": m["actor_loss"]} for m in updates if "actor_loss" in m]
                    if ddp is not None:  # every rank sees (and guards) the same mean metrics
                        critic_part = _averaged(ddp, critic_part)
                        actor_part = _averaged(ddp, actor_part)
                    critic_metrics.add(critic_part, counters.env_step, agent.num_updates)
                    if actor_part:
                        actor_metrics.add(actor_part, counters.env_step, agent.num_updates)

                # 4. report finished episodes (this rank's envs; episodes cut by a restart are not reported)
                episode_return += reward
                done = nxt["done"][:, 0]
                if bool(done.any()):
                    now = time.monotonic()
                    sps = (counters.env_step - row_step) / max(now - row_time, 1e-9)
                    row_step, row_time = counters.env_step, now
                    row = {"episode_return": episode_return[done].mean().item(), "sps": sps,
                           **critic_metrics.pop_means(), **actor_metrics.pop_means()}  # fmt: skip
                    logger.log(counters.env_step, wall_time(), row)
                episode_return[ended] = 0.0

                # 5. evaluate (rank 0), checkpoint; their time is left out of SPS
                paused = time.monotonic()
                if evaluation and lead:
                    eval_seed = episode_seed(cfg.seed, counters.env_step, stream=1)
                    mean, std = evaluate(_Deterministic(agent), eval_env, eval_seed)
                    counters.last_eval_return = mean
                    logger.log(counters.env_step, wall_time(), {"eval_return": mean, "eval_return_std": std})
                    progress.update(counters.env_step, eval_return=mean)
                if checkpoint:
                    save(ckpt_dir / LATEST, cfg.save_buffer)
                    guard.checkpoint_step = counters.env_step
                    if lead and evaluation and cfg.keep_eval_checkpoints:
                        copy_checkpoint(ckpt_dir / LATEST, ckpt_dir / f"step_{counters.env_step}.pt")
                if restart and not end:
                    current = _observations(start_episodes(env, seed, counters.env_step))
                    episode_return.zero_()
                row_time += time.monotonic() - paused
                progress.update(counters.env_step)
    return counters


def _averaged(ddp: Distributed, updates: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The same metrics, each the mean over ranks (one collective for all of them)."""
    if not updates:
        return updates
    keys = list(updates[0])
    means = ddp.average(torch.stack([torch.stack([m[k].float() for k in keys]) for m in updates]))
    return [dict(zip(keys, row, strict=True)) for row in means]
