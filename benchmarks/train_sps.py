"""What throughput does `make train` (SAC + LoRA critic, cheetah-run, the paper's settings) get on this CPU?

Times the two phases of the training loop of fasttd3_lora.train with the default config: the random phase (first
learning_starts agent steps: env steps only) and the learning phase (act + env step + updates_per_step updates),
for 1, 2 and the `threads=auto` count of torch threads, and the evaluation (10 deterministic episodes). Prints
medians of repeated blocks and env steps per second (SPS), and which row the default `threads=auto` picks under
the current load; docs/training.md quotes them.

    .venv/bin/python benchmarks/train_sps.py [--blocks 5] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("MUJOCO_GL", "disabled")

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402

from fasttd3_lora.config import compose_config  # noqa: E402
from fasttd3_lora.threads import choose_threads  # noqa: E402
from fasttd3_lora.envs import EnvRequest, make_envs  # noqa: E402
from fasttd3_lora.loops import sac as sac_loop  # noqa: E402
from fasttd3_lora.loops.kit import evaluate  # noqa: E402
from fasttd3_lora.sac import SACConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks per case (median reported)")
    parser.add_argument("--steps", type=int, default=20, help="agent steps per block")
    args = parser.parse_args()

    cfg = compose_config([])
    auto, why = choose_threads("auto", {})  # what a run started now would pick (ignoring OMP_NUM_THREADS)
    algo = SACConfig.from_hydra(cfg)
    env, eval_env = make_envs(EnvRequest(cfg.task, algo.num_envs, algo.action_repeat, cfg.seed, "cpu", cfg.eval_episodes))
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    env_steps = cfg.algo.num_envs * cfg.algo.action_repeat
    rows = []
    for threads in sorted({1, 2, auto}):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        generator = torch.Generator().manual_seed(0)
        agent, replay = sac_loop.build(algo, obs_dim, act_dim, 10**6, torch.device("cpu"), generator)
        td = env.reset()
        for _ in range(cfg.algo.batch_size):  # enough transitions to sample batches from
            td.set("action", torch.rand(1, act_dim) * 2 - 1)
            out, td = env.step_and_maybe_reset(td)
            nxt = out["next"]
            replay.add(TensorDict({"observation": out["observation"], "action": out["action"],
                                   "reward": nxt["reward"][:, 0], "next_observation": nxt["observation"],
                                   "terminated": nxt["terminated"][:, 0], "truncated": nxt["truncated"][:, 0]},
                                  batch_size=[1]))  # fmt: skip

        def random_step() -> None:
            nonlocal td
            td.set("action", torch.rand(1, act_dim) * 2 - 1)
            _, td = env.step_and_maybe_reset(td)

        def learning_step() -> None:
            nonlocal td
            td.set("action", agent.act(td["observation"]))
            _, td = env.step_and_maybe_reset(td)
            for _ in range(cfg.algo.updates_per_step):
                agent.update(replay.sample(cfg.algo.batch_size, generator))

        for phase, step in (("random", random_step), ("learning", learning_step)):
            step()  # warm-up
            times = []
            for _ in range(args.blocks):
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times.append((time.perf_counter() - start) / args.steps)
            per_step = statistics.median(times)
            rows.append((phase, threads, per_step * 1e3, env_steps / per_step))
        start = time.perf_counter()
        evaluate(agent, eval_env, seed=0)
        rows.append(("eval (10 episodes)", threads, (time.perf_counter() - start) * 1e3, float("nan")))
    env.close()
    eval_env.close()

    print(f"default config: {cfg.task.name}, critic {cfg.critic.kind} d={cfg.scale.critic_hidden_dim} "
          f"L={cfg.scale.critic_num_blocks}, batch {cfg.algo.batch_size}, {cfg.algo.updates_per_step} updates/step; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print(f"{'phase':<20} {'threads':>7} {'ms / agent step':>16} {'SPS':>8}")
    for phase, threads, ms, sps in rows:
        print(f"{phase:<20} {threads:>7} {ms:>16.1f} {sps:>8.0f}" if sps == sps else
              f"{phase:<20} {threads:>7} {ms:>16.0f} {'(total ms)':>8}")  # fmt: skip
    learning = {t: ms for phase, t, ms, _ in rows if phase == "learning"}
    print(f"learning phase: 2 threads take {learning[2] / learning[1]:.2f}x the time of 1")
    print(f"threads=auto picks {auto} here ({why}): {learning[auto] / min(learning.values()):.2f}x the best time")


if __name__ == "__main__":
    main()
