"""Write configs/task/dmc/<domain>-<task>.yaml for every task of dm_control.suite.ALL_TASKS.

Run once after a dm_control upgrade: `python scripts/make_dmc_task_configs.py`. tests/test_config.py checks
that the directory matches ALL_TASKS, so a stale set fails CI rather than a user's command line.
"""

from pathlib import Path

from dm_control import suite

# Every suite task runs 1000 control steps; the two lqr tasks have no time limit in dm_control and are capped at
# the same 1000 so every DMC episode has the same length.
MAX_EPISODE_STEPS = 1000
TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "task" / "dmc"


def main() -> None:
    TASK_DIR.mkdir(parents=True, exist_ok=True)
    for stale in TASK_DIR.glob("*.yaml"):
        stale.unlink()
    for domain, task in suite.ALL_TASKS:
        name = f"{domain}-{task}"
        (TASK_DIR / f"{name}.yaml").write_text(
            f"name: dmc/{name}\nfamily: dmc\nmax_episode_steps: {MAX_EPISODE_STEPS}\n"
        )
    print(f"wrote {len(suite.ALL_TASKS)} task configs to {TASK_DIR}")


if __name__ == "__main__":
    main()
