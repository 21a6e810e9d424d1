"""The FastTD3 loop of the training app (`python -m fasttd3_lora.train algo=fasttd3 ...`; docs/fasttd3.md).

    every agent step          act on all envs at once (each env with its own exploration noise scale), step them,
                              store the step (true final observations at episode ends when the env has them),
                              re-draw the noise scale of the envs whose episode ended, then updates_per_step
                              updates (the actor every policy_frequency-th); a non-finite loss or Q stops the run
    every eval_every          deterministic episodes (DMC: separate envs; Isaac Lab: the training env, after
                              which the training episodes restart)
    every checkpoint_every    checkpoints/latest.pt with the running episodes (dm_control, one process), or,
                              where the envs cannot save them, after which every training episode restarts

Run directory, metrics, evaluation, checkpoints, exact resume and the non-finite guard come from the loop kit
(`fasttd3_lora.loops.kit`), as the SAC loop's do. Under torchrun (`fasttd3_lora.distributed`) every rank runs
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
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import Tensor

from fasttd3_lora.distributed import Distributed, init_from_env, rank_seed
from fasttd3_lora.envs import EnvRequest, env_deploy_facts, make_envs
from fasttd3_lora.fasttd3 import FastTD3, FastTD3Config
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
    restore,
    in_progress,
    saves_episodes,
    seed_everything,
)
from fasttd3_lora.replay import NStepReplayBuffer

__all__ = ["build", "run"]

OBS_KEYS = ("observation", "critic_observation")


def build(
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
    """FastTD3's noiseless policy with the `act(obs, deterministic=True)` face `kit.evaluate` calls."""

    def __init__(self, agent: FastTD3) -> None:
        self.agent = agent

    def act(self, obs: Tensor, deterministic: bool = True) -> Tensor:
        return self.agent.act(obs, explore=not deterministic)


def _observations(td: TensorDict) -> TensorDict:
    return td.select(*(k for k in OBS_KEYS if k in td.keys()))


def run(cfg: DictConfig, fcfg: FastTD3Config, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one FastTD3 run writing into `run_dir` (see the module docstring)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    ddp = init_from_env(cfg.device)
    rank, world = (0, 1) if ddp is None else (ddp.rank, ddp.world_size)
    lead = rank == 0
    device = torch.device(cfg.device) if ddp is None else ddp.device
    num_envs = fcfg.num_envs
    env_steps_per_agent_step = num_envs * fcfg.action_repeat * world  # env steps count every rank's envs
    total_agent_steps = math.ceil(cfg.total_env_steps / env_steps_per_agent_step)
    total_updates = max(1, (total_agent_steps - fcfg.learning_starts) * fcfg.updates_per_step)
    resume = load_resume(cfg, resolved)

    seed = rank_seed(cfg.seed, rank)  # this rank's envs and random draws
    seed_everything(cfg.seed)  # network weights: the same on every rank (and broadcast from rank 0)
    generator = torch.Generator(device).manual_seed(seed)
    with ExitStack() as stack:
        if ddp is not None:
            stack.callback(ddp.close)
        env, eval_env = make_envs(EnvRequest.of_run(cfg, num_envs, fcfg.action_repeat, seed, str(device)))
        stack.callback(env.close)
        shares_env = eval_env is env  # Isaac Lab: one env per process
        if not shares_env:
            stack.callback(eval_env.close)
        agent, replay = build(fcfg, env, total_updates, device, generator, ddp)
        env_facts = env_deploy_facts(env)
        counters, updates_from = Counters(), fcfg.learning_starts
        if resume is not None:  # a multi-process resume refills its buffers (checkpoints hold none)
            counters, updates_from = restore(resume, agent, replay if world == 1 else None, generator,
                                             fcfg.learning_starts)  # fmt: skip
        record = RunRecord(stack, cfg, resolved, run_dir, overrides, counters, resumed=resume is not None,
                           learning_from=updates_from * env_steps_per_agent_step, lead=lead)  # fmt: skip
        saved_progress = None if resume is None else resume.get("in_progress")
        del resume
        record.announce(f"{cfg.task.name}, fasttd3 with a {cfg.critic.kind} critic, {num_envs} envs x {world} "
                        "process(es)")  # fmt: skip
        keeps_episodes = saves_episodes(env, world)
        # DMC episodes last max_episode_steps env steps in every env at once; a checkpoint that cannot keep them
        # (EnvPool, several processes) restarts them all.
        episode_round = num_envs * world * cfg.task.max_episode_steps
        if cfg.task.family == "dmc" and not keeps_episodes and cfg.checkpoint_every % episode_round:
            record.progress.write(f"note: checkpoint_every={cfg.checkpoint_every} cuts training episodes short "
                                  f"(each checkpoint restarts them); a multiple of {episode_round} (envs x episode) "
                                  "does not")  # fmt: skip

        def checkpoint(keep_copy: bool = False) -> None:
            keep = replay if cfg.save_buffer and world == 1 else None
            progress = None
            if counters.env_step:
                progress = in_progress(env, keeps_episodes, episode_return, critic_metrics, actor_metrics)
            state = record.checkpoint(agent, keep, generator, env_facts, keep_copy=keep_copy, progress=progress)
            # Every rank continues from what was saved, as a resumed run does (fasttd3_lora.loops.kit explains
            # why): the replicas stay identical.
            agent.load_state_dict(state["agent"])

        episode_return = EpisodeReturns(num_envs, env.device)
        critic_metrics, actor_metrics = UpdateMetrics(), UpdateMetrics()
        if counters.env_step == 0:
            checkpoint()  # the guard's last finite state exists from the start
        current = _observations(continue_episodes(env, saved_progress, seed, counters.env_step, episode_return,
                                                  critic_metrics, actor_metrics))  # fmt: skip
        row_step, row_time = counters.env_step, time.monotonic()
        with reported_stops(record.guard(agent)):
            while counters.env_step < cfg.total_env_steps:
                # 1. act (every env with its own noise scale) and step all envs at once
                action = agent.act(current["observation"])
                td = current.clone(recurse=False)
                td.set("action", action.to(env.device))
                td, next_td = env.step_and_maybe_reset(td)
                end, evaluation, checkpoint_due = advance(counters, env_steps_per_agent_step, cfg)
                # Episodes restart after a checkpoint that cannot keep them (exact resume), and on Isaac Lab after
                # rank 0's evaluation.
                restart = (checkpoint_due and not keeps_episodes) or (evaluation and shares_env and lead)

                # 2. store: ("next", obs) is the true final observation where the env gives one; a restart ends
                # every episode as a time-out (it bootstraps)
                nxt = td["next"]
                reward, terminated = nxt["reward"][:, 0], nxt["terminated"][:, 0]
                truncated = nxt["truncated"][:, 0] | restart
                step = {"action": td["action"], "reward": reward, "terminated": terminated, "truncated": truncated}
                for key in current.keys():
                    step[key], step[f"next_{key}"] = current[key], nxt[key]
                replay.add(TensorDict(step, batch_size=[num_envs], device=env.device))
                observed = {key: nxt[key] for key in current.keys()}
                if ddp is not None:  # identical normaliser statistics on every rank: all ranks' observations
                    observed = {key: ddp.gather_rows(value) for key, value in observed.items()}
                agent.record(observed["observation"], observed.get("critic_observation"))
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

                # 4. report finished episodes (this rank's envs; not those cut by a restart or a spread start)
                finished = episode_return.add(reward, nxt["done"][:, 0])
                if finished is not None:
                    now = time.monotonic()
                    sps = (counters.env_step - row_step) / max(now - row_time, 1e-9)
                    row_step, row_time = counters.env_step, now
                    record.log({**EpisodeReturns.row(finished[0]), "sps": sps, **critic_metrics.pop_means(),
                                **actor_metrics.pop_means()})  # fmt: skip

                # 5. evaluate (rank 0), checkpoint; their time is left out of SPS
                paused = time.monotonic()
                if evaluation and lead:
                    eval_seed = episode_seed(cfg.seed, counters.env_step, stream=1)
                    record.evaluate(_Deterministic(agent), eval_env, eval_seed)
                if checkpoint_due:
                    checkpoint(keep_copy=evaluation and cfg.keep_eval_checkpoints)
                if restart and not end:
                    current = _observations(episode_return.restart(env, seed, counters.env_step))
                row_time += time.monotonic() - paused
                record.progress.update(counters.env_step)
    return counters


def _averaged(ddp: Distributed, updates: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The same metrics, each the mean over ranks (one collective for all of them)."""
    if not updates:
        return updates
    keys = list(updates[0])
    means = ddp.average(torch.stack([torch.stack([m[k].float() for k in keys]) for m in updates]))
    return [dict(zip(keys, row, strict=True)) for row in means]
