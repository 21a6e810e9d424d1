"""LoRASA's cost per agent (docs/mappo.md): trainable numbers and bytes of one agent's adapter against one actor,
and the time of every agent's forward as one mixed batch (each row through its agent's adapter) against a loop over
agents (merged copies) and against separate networks (NPS).

    python benchmarks/lorasa_agents.py [--envs 16 4096 --rank 8 --hidden 64 64 --rnn 64 --rnn-after 64 --threads 1 --reps 50]

Prints two tables for MaMuJoCo's HalfCheetah 2x3 and Ant 4x2 actors (obs 12 / 42, act 3 / 2, 64 x 64 as LoRASA's
MLP part; `--rnn H` adds LoRASA's GRU of H units, its adapters on the GRU's input and hidden maps, and the layers
of `--rnn-after` after it (default one of 64, the authors'), one step from a random state): sizes, then median milliseconds per call over `--reps` timed calls (after warm-up) with the
ratio to the mixed batch. Adapters are random (A ~ N(0, 0.1)); the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import platform

import torch

from fasttd3_lora.adapters import adapter_layers
from fasttd3_lora.mappo import adapt_lorasa, make_actor
from update_floor import median_ms

ACTORS = {"HalfCheetah 2x3": (2, 12, 3), "Ant 4x2": (4, 42, 2)}  # agents, obs, act


def sizes(rank: int, hidden: list[int], rnn: int | None, after: list[int]) -> list[str]:
    rows = []
    for name, (agents, obs, act) in ACTORS.items():
        shared = make_actor("shared", obs, act, hidden, agents, 0.5, rnn, after)
        actor_numbers = sum(p.numel() for p in shared.parameters()) - (agents - 1) * act  # one agent's log-std
        adapt_lorasa(shared, rank, None)
        layers = adapter_layers(shared)
        per_agent = sum(layer.adapter_numel() for layer in layers) + act  # + its log-std row
        nbytes = sum(layer.adapter_nbytes() for layer in layers) + 4 * act
        rows.append(f"| {name} | {actor_numbers:,} | {per_agent:,} | {100 * per_agent / actor_numbers:.1f}% | "
                    f"{nbytes:,} | {agents} x {per_agent:,} = {agents * per_agent:,} vs NPS {agents * actor_numbers:,} |")  # fmt: skip
    return rows


def action(policy: torch.nn.Module, obs: torch.Tensor, agent: torch.Tensor | None, hidden: torch.Tensor | None) -> torch.Tensor:
    """A policy's deterministic action; a recurrent one's from `hidden` (its next state dropped)."""
    if hidden is None:
        return policy.deterministic_action(obs, agent)
    return policy.deterministic_action(obs, agent, hidden)[0]


def timings(rank: int, hidden: list[int], rnn: int | None, after: list[int], envs: int, reps: int) -> list[str]:
    rows = []
    for name, (agents, obs_dim, act) in ACTORS.items():
        torch.manual_seed(0)
        lorasa = make_actor("shared", obs_dim, act, hidden, agents, 0.5, rnn, after)
        adapt_lorasa(lorasa, rank, None)
        for layer in adapter_layers(lorasa):
            torch.nn.init.normal_(layer.lora_A, std=0.1)
        merged = [lorasa.merged(k) for k in range(agents)]
        separate = make_actor("separate", obs_dim, act, hidden, agents, 0.5, rnn, after)
        obs = torch.randn(envs * agents, obs_dim)
        state = None if rnn is None else torch.tanh(torch.randn(envs * agents, rnn))
        agent = torch.arange(agents).repeat(envs)  # rows (env, agent) as MAPPO lays them out
        rows_of = [torch.nonzero(agent == k).squeeze(-1) for k in range(agents)]

        def loop_merged() -> torch.Tensor:
            out = torch.empty(len(obs), act)
            for k, rows in enumerate(rows_of):
                out[rows] = action(merged[k], obs[rows], None, None if state is None else state[rows])
            return out

        calls = {"LoRASA, one mixed batch": lambda: action(lorasa, obs, agent, state),
                 "LoRASA, loop over agents (merged copies)": loop_merged,
                 "NPS, one network per agent (dense)": lambda: action(separate, obs, agent, state),
                 "PS, one plain network on every row": lambda: action(merged[0], obs, None, state)}  # fmt: skip
        with torch.no_grad():
            diff = (calls["LoRASA, one mixed batch"]() - loop_merged()).abs().max().item()
            for fn in calls.values():
                median_ms(fn, 5)  # warm-up
            measured = {label: median_ms(fn, reps)[0] for label, fn in calls.items()}
        mixed = measured["LoRASA, one mixed batch"]
        for label, ms in measured.items():
            rows.append(f"| {name} | {envs} x {agents} | {label} | {ms:.3f} | {ms / mixed:.2f} |")
        rows.append(f"| {name} | {envs} x {agents} | max abs diff, mixed vs merged loop | {diff:.1e} | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--envs", type=int, nargs="+", default=[16, 4096])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--rnn", type=int, default=None, help="a GRU of this many units after the MLP (recurrent actor)")
    parser.add_argument("--rnn-after", type=int, nargs="*", default=[64], help="with --rnn: the layers after the GRU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = f"{args.hidden}" + ("" if args.rnn is None else f" -> GRU {args.rnn} -> {args.rnn_after}")
    print(f"LoRASA rank {args.rank}, actor obs -> {shape} -> act, {args.threads} thread(s), "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}\n")  # fmt: skip
    print("| actor | one actor's numbers | one agent's adapter + log-std | ratio | adapter bytes (fp32) | all agents |")
    print("|---|---|---|---|---|---|")
    print("\n".join(sizes(args.rank, args.hidden, args.rnn, args.rnn_after)))
    print(f"\n| actor | envs x agents | forward of every agent | median ms (of {args.reps}) | vs mixed |")
    print("|---|---|---|---|---|")
    for envs in args.envs:
        print("\n".join(timings(args.rank, args.hidden, args.rnn, args.rnn_after, envs, args.reps)))


if __name__ == "__main__":
    main()
