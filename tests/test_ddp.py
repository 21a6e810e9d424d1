"""Two-process FastTD3 on CPU with the gloo backend (fasttd3_lora/distributed.py): the replicas' parameters stay
bit-identical through many updates while each rank steps its own envs from its own seed. The env is the
GPU-free Isaac Lab stand-in (tests/isaaclab_standin.py), swapped in for `make_isaaclab_env` in each process."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fasttd3_lora.distributed import RANK_SEED_OFFSET, rank_seed
from tiny_runs import SMALL_NETS

WORLD = 2
OVERRIDES = [
    "algo=fasttd3",
    "task=Isaac-Velocity-Flat-H1-v0",
    "device=cpu",
    "algo.num_envs=64",
    "algo.batch_size=128",
    "total_env_steps=2560",  # 20 agent steps of 2 x 64 envs: (20 - 10) x 4 = 40 updates per rank
    "eval_every=1280",
    "checkpoint_every=100000",
    *SMALL_NETS,
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out: str) -> None:
    """One rank: the app's FastTD3 loop under torchrun's environment variables; saves what the test compares."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    import isaaclab_standin as standin

    from fasttd3_lora.config import compose_config
    from fasttd3_lora.runner import train
    from fasttd3_lora.loops import fasttd3 as loop
    from fasttd3_lora.tasks import isaaclab

    seeds: list[int] = []

    def factory(name, num_envs, seed, device, physics, headless, render=False):
        seeds.append(seed)
        return isaaclab.IsaacLabEnv(standin.make_standin(num_envs, 3, seed=seed, final_obs=True), task="standin")

    captured = {}
    build = loop.build

    def capturing_build(*args, **kwargs):
        captured["agent"], captured["replay"] = build(*args, **kwargs)
        return captured["agent"], captured["replay"]

    isaaclab.make_isaaclab_env = factory
    loop.build = capturing_build
    counters = train(compose_config(OVERRIDES), Path(out) / "run", OVERRIDES)
    agent = captured["agent"]
    torch.save({
        "seeds": seeds,
        "env_step": counters.env_step,
        "num_updates": agent.num_updates,
        "params": {f"{net}.{k}": v for net in ("actor", "critic", "target_critic")
                   for k, v in getattr(agent, net).state_dict().items()},
        "obs_rms": agent.obs_rms.state_dict(),
        "first_obs": captured["replay"].storage["observation"][:, 0].clone(),
        "last_eval_return": counters.last_eval_return,
    }, Path(out) / f"rank{rank}.pt")  # fmt: skip


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def test_replicas_stay_bit_identical_through_the_updates(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["num_updates"] == b["num_updates"] == (20 - 10) * 4
    assert a["params"].keys() == b["params"].keys() and len(a["params"]) > 10
    different = [k for k in a["params"] if not torch.equal(a["params"][k], b["params"][k])]
    assert different == []
    for key in a["obs_rms"]:  # the normaliser folds in both ranks' observations
        assert torch.equal(a["obs_rms"][key], b["obs_rms"][key]), key


def test_ranks_step_their_own_envs_from_distinct_seeds(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["seeds"] == [rank_seed(0, 0)] == [0] and b["seeds"] == [rank_seed(0, 1)] == [RANK_SEED_OFFSET]
    assert not torch.equal(a["first_obs"], b["first_obs"])


def test_env_steps_count_both_ranks_and_rank_0_alone_evaluates(ranks: list[dict]) -> None:
    a, b = ranks
    assert a["env_step"] == b["env_step"] == 2560  # 20 agent steps x 64 envs x 2 ranks
    assert a["last_eval_return"] is not None and b["last_eval_return"] is None
