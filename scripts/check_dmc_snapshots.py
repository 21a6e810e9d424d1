"""Check that every DMC task's running episodes continue bit for bit from a snapshot (docs/training.md, "Exact
resume"): for each task, 2 envs step 25 random actions, are saved (`DMCEnv.snapshot`), step 35 more; fresh envs of
another seed restore the snapshot (`DMCEnv.restore_episodes`) and step the same 35 actions. Prints one line per
task (same / DIFFERS / the error) and exits 1 if any differs. Not part of CI (a few minutes for ~60 tasks).

    python scripts/check_dmc_snapshots.py [TASK ...]     (default: every task list_dmc_tasks() names)
"""

from __future__ import annotations

import sys

import torch

from fasttd3_lora.tasks.dmc import DMCEnv, list_dmc_tasks


def continues(task: str) -> bool:
    gen = torch.Generator().manual_seed(0)
    with DMCEnv(task, 2, seed=1, num_workers=0) as env:
        actions = [torch.rand(2, env.action_spec.shape[-1], generator=gen) * 2 - 1 for _ in range(60)]
        td = env.reset()
        for action in actions[:25]:
            td = env.step_and_maybe_reset(td.set("action", action))[1]
        saved = env.snapshot()
        expected = []
        for action in actions[25:]:
            td, following = env.step_and_maybe_reset(td.set("action", action))
            expected.append((td["next", "observation"].clone(), td["next", "reward"].clone()))
            td = following
    with DMCEnv(task, 2, seed=9, num_workers=0) as env:
        env.reset()
        td = env.restore_episodes(saved)
        for (obs, reward), action in zip(expected, actions[25:], strict=True):
            td, following = env.step_and_maybe_reset(td.set("action", action))
            if not (torch.equal(td["next", "observation"], obs) and torch.equal(td["next", "reward"], reward)):
                return False
            td = following
    return True


def main() -> None:
    failed = 0
    for task in sys.argv[1:] or list_dmc_tasks():
        try:
            verdict = "same" if continues(task) else "DIFFERS"
        except Exception as err:  # noqa: BLE001 (report every task, not just the first failure)
            verdict = f"error: {type(err).__name__}: {str(err).splitlines()[0][:100]}"
        failed += verdict == "DIFFERS"
        print(f"{task}: {verdict}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
