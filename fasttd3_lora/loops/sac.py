"""The SAC loop (`python -m fasttd3_lora.train`, the default algorithm; DESIGN §5, docs/training.md):

    every agent step          act (uniformly random before learning_starts), step the envs, store the transition,
                              then updates_per_step agent updates; a non-finite loss or Q stops the run (exit 3)
    every eval_every steps    eval_episodes deterministic episodes on separate envs
    every checkpoint_every    checkpoints/latest.pt with the running episodes (dm_control), or, where the envs
                              cannot save them (EnvPool), after which every training episode restarts (exact
                              resume either way, `fasttd3_lora.loops.kit`)

Steps are simulator steps (`env_step`, DESIGN §5) unless named agent steps: one agent step is
num_envs x action_repeat env steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict

from fasttd3_lora.envs import EnvRequest, env_deploy_facts, make_envs
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
from fasttd3_lora.replay import ReplayBuffer
from fasttd3_lora.sac import SAC, SACConfig

__all__ = ["build", "run"]


def build(
    algo: SACConfig, obs_dim: int, act_dim: int, total_updates: int, device: torch.device, generator: torch.Generator
) -> tuple[SAC, ReplayBuffer]:
    """The agent and its replay buffer."""
    agent = SAC(algo, obs_dim, act_dim, algo.num_envs, total_updates, device, generator)
    return agent, ReplayBuffer(algo.buffer_size, obs_dim, act_dim, device=device)


def run(cfg: DictConfig, algo: SACConfig, run_dir: str | Path, overrides: Sequence[str] = ()) -> Counters:
    """Run (or, with `cfg.resume`, continue) one SAC run writing into `run_dir` (see the module docstring)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    device = torch.device(cfg.device)
    env_steps_per_agent_step = algo.num_envs * algo.action_repeat
    total_agent_steps = math.ceil(cfg.total_env_steps / env_steps_per_agent_step)
    # Updates follow every agent step after the first learning_starts (SimbaV2); the LR schedule spans them all.
    total_updates = max(1, (total_agent_steps - algo.learning_starts) * algo.updates_per_step)
    resume = load_resume(cfg, resolved)

    seed_everything(cfg.seed)  # network weights are drawn from torch's global RNG
    generator = torch.Generator(device).manual_seed(cfg.seed)  # actions, noise and replay sampling
    with ExitStack() as stack:
        env, eval_env = make_envs(EnvRequest.of_run(cfg, algo.num_envs, algo.action_repeat, cfg.seed, cfg.device))
        stack.callback(env.close)
        stack.callback(eval_env.close)
        obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
        agent, replay = build(algo, obs_dim, act_dim, total_updates, device, generator)
        env_facts = env_deploy_facts(env)
        counters, updates_from = Counters(), algo.learning_starts
        if resume is not None:
            counters, updates_from = restore(resume, agent, replay, generator, algo.learning_starts)
        record = RunRecord(stack, cfg, resolved, run_dir, overrides, counters, resumed=resume is not None,
                           learning_from=updates_from * env_steps_per_agent_step)  # fmt: skip
        saved_progress = None if resume is None else resume.get("in_progress")
        del resume  # the buffer now lives in `replay`: free the loaded copy
        record.announce(f"{cfg.task.name}, sac with a {cfg.critic.kind} critic")
        keeps_episodes = saves_episodes(env)

        num_envs = algo.num_envs
        episode_return, metrics = EpisodeReturns(num_envs, env.device), UpdateMetrics()

        def checkpoint(keep_copy: bool = False) -> None:
            progress = in_progress(env, keeps_episodes, episode_return, metrics) if counters.env_step else None
            record.checkpoint(agent, replay if cfg.save_buffer else None, generator, env_facts, keep_copy=keep_copy,
                              progress=progress)  # fmt: skip

        if counters.env_step == 0:
            checkpoint()  # the guard's last finite state exists from the start
        obs = continue_episodes(env, saved_progress, cfg.seed, counters.env_step, episode_return, metrics)["observation"]
        row_step, row_time = counters.env_step, time.monotonic()
        with reported_stops(record.guard(agent)):
            while counters.env_step < cfg.total_env_steps:
                # 1. act and step
                if counters.agent_step < algo.learning_starts:
                    action = torch.rand((num_envs, act_dim), generator=generator, device=generator.device) * 2 - 1
                else:
                    action = agent.act(obs)
                td = TensorDict({"observation": obs, "action": action.to(env.device)}, batch_size=[num_envs])
                td, next_td = env.step_and_maybe_reset(td)
                end, evaluation, checkpoint_due = advance(counters, env_steps_per_agent_step, cfg)

                # 2. store; a checkpoint that cannot keep the episodes ends them all (time-outs: they bootstrap)
                cut = checkpoint_due and not keeps_episodes
                nxt = td["next"]
                reward, done = nxt["reward"][:, 0], nxt["done"][:, 0]
                truncated = nxt["truncated"][:, 0] | cut
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

                # 4. report finished episodes (not those cut by a checkpoint or a spread start: `EpisodeReturns`)
                ended = episode_return.add(reward, done)
                if ended is not None:
                    now = time.monotonic()
                    sps = (counters.env_step - row_step) / max(now - row_time, 1e-9)
                    row_step, row_time = counters.env_step, now
                    record.log({**EpisodeReturns.row(ended[0]), "sps": sps, **metrics.pop_means()})

                # 5. evaluate, checkpoint (their time is left out of SPS)
                paused = time.monotonic()
                if evaluation:
                    record.evaluate(agent, eval_env, episode_seed(cfg.seed, counters.env_step, stream=1))
                if checkpoint_due:
                    checkpoint(keep_copy=evaluation and cfg.keep_eval_checkpoints)
                if cut and not end:
                    obs = episode_return.restart(env, cfg.seed, counters.env_step)["observation"]
                row_time += time.monotonic() - paused
                record.progress.update(counters.env_step)
    return counters
