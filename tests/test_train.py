"""The training app end to end on tiny networks: run directory, exact resume, SIGKILL resume, one-line failures,
the non-finite guard, logging sinks (metrics.csv, TensorBoard, offline wandb) and the progress display."""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from fasttd3_lora import train as train_mod
from fasttd3_lora.checkpoint import load_checkpoint, save_checkpoint
from fasttd3_lora.config import ConfigError, compose_config, drop_unused_groups
from fasttd3_lora.run_logging import MetricsCSV, Progress, RunLogger
from fasttd3_lora.loops import kit
from fasttd3_lora.loops.kit import Counters, NonFiniteError, advance, crossed
from fasttd3_lora.runner import train
from fasttd3_lora.train import prepare_command_line
from tiny_runs import Crash, crash_after_log, crash_at

# 25 agent steps per episode (50 control steps, action repeat 2); 150 agent steps in all, updates after 50.
TINY = [
    "task=dmc/cartpole-balance",
    "task.max_episode_steps=50",
    "scale.critic_hidden_dim=32",
    "scale.critic_num_blocks=1",
    "critic.rank=8",
    "algo.actor_hidden_dim=16",
    "algo.batch_size=32",
    "algo.buffer_size=2000",
    "algo.learning_starts=50",
    "total_env_steps=300",
    "eval_every=100",
    "checkpoint_every=100",
    "eval_episodes=2",
]
# One torch thread: tiny matmuls on a busy 2-core machine are ~500x slower with two (OpenMP spin-waits).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "disabled"}
ENV.pop("WANDB_MODE", None)
METRIC_COLUMNS = {"env_step", "wall_time", "episode_return", "eval_return", "critic_loss", "actor_loss", "q_mean",
                  "entropy", "temperature", "sps"}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fasttd3_lora.train", *args],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def agent_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(checkpoint)
    flat: dict[str, torch.Tensor] = {}

    def walk(tree, prefix: str) -> None:
        if isinstance(tree, torch.Tensor):
            flat[prefix] = tree
        elif isinstance(tree, dict):
            for key, value in tree.items():
                walk(value, f"{prefix}.{key}")

    walk({"agent": state["agent"], "replay": state["replay"], "rng": state["rng"]}, "")
    return flat


# ---------------------------------------------------------------------------------------- the loop in-process


def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_config(TINY)
    whole = train(cfg, tmp_path / "whole", TINY)

    # The same run dies at env_step 290, after updates past its checkpoint at 200; then it is resumed.
    crash_at(monkeypatch, 290)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "broken", TINY)
    assert load_checkpoint(tmp_path / "broken" / "checkpoints" / "latest.pt")["meta"]["counters"]["env_step"] == 200
    assert rows(tmp_path / "broken")[-1]["env_step"] == "250"  # a row past the checkpoint, to be dropped
    monkeypatch.undo()
    resumed = train(compose_config([*TINY, f"resume={tmp_path / 'broken'}"]), tmp_path / "broken", TINY)

    assert (resumed.env_step, resumed.agent_step, resumed.last_eval_return) == (
        whole.env_step, whole.agent_step, whole.last_eval_return,
    )  # fmt: skip
    a, b = agent_tensors(tmp_path / "whole" / "checkpoints" / "latest.pt"), agent_tensors(
        tmp_path / "broken" / "checkpoints" / "latest.pt"
    )
    assert a.keys() == b.keys() and len(a) > 20
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == []
    # The resumed metrics.csv holds each step once, with the same numbers as the uninterrupted run.
    skip = {"wall_time", "sps"}
    same = [{k: v for k, v in r.items() if k not in skip} for r in rows(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k not in skip} for r in rows(tmp_path / "broken")] == same


def test_checkpoints_inside_episodes_cut_none_and_resume_bit_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dm_control envs keep their running episodes in the checkpoint: with checkpoints every 70 steps of 50-step
    episodes the only time-outs stored are the 6 episode ends, and a run killed past its checkpoint at 210
    (mid-episode) resumes to the same agent, buffer and metrics (tests/test_dmc_env.py checks the envs alone)."""
    short = [*TINY, "checkpoint_every=70"]
    whole = train(compose_config(short), tmp_path / "whole", short)
    latest = load_checkpoint(tmp_path / "whole" / "checkpoints" / "latest.pt")
    assert int(latest["replay"]["storage"]["truncated"].sum()) == 300 // 50
    crash_at(monkeypatch, 250)
    with pytest.raises(Crash):
        train(compose_config(short), tmp_path / "broken", short)
    saved = load_checkpoint(tmp_path / "broken" / "checkpoints" / "latest.pt")
    assert saved["meta"]["counters"]["env_step"] == 210 and saved["in_progress"]["env"]["envs"][0]["steps"] == 10
    assert float(saved["in_progress"]["returns"]["sums"][0]) != 0.0  # the return so far of the episode in progress
    monkeypatch.undo()
    resumed = train(compose_config([*short, f"resume={tmp_path / 'broken'}"]), tmp_path / "broken", short)
    assert (resumed.env_step, resumed.last_eval_return) == (whole.env_step, whole.last_eval_return)
    a, b = agent_tensors(tmp_path / "whole" / "checkpoints" / "latest.pt"), agent_tensors(
        tmp_path / "broken" / "checkpoints" / "latest.pt"
    )
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    skip = {"wall_time", "sps"}
    same = [{k: v for k, v in r.items() if k not in skip} for r in rows(tmp_path / "whole")]
    assert [{k: v for k, v in r.items() if k not in skip} for r in rows(tmp_path / "broken")] == same
    assert sum(1 for r in same if r["episode_return"]) == 300 // 50  # every episode reported, none cut


def test_a_run_killed_before_its_first_periodic_checkpoint_resumes_without_duplicate_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resume starts from the checkpoint written at env_step 0, so the rows the killed run logged (env_step 50)
    must go: each step appears once in metrics.csv and in TensorBoard."""
    short = [*TINY, "total_env_steps=200", "seed=4294967295"]  # the largest seed numpy accepts works end to end
    whole = train(compose_config(short), tmp_path / "whole", short)
    crash_after_log(monkeypatch, 50)
    with pytest.raises(Crash):
        train(compose_config(short), tmp_path / "broken", short)
    assert load_checkpoint(tmp_path / "broken" / "checkpoints" / "latest.pt")["meta"]["counters"]["env_step"] == 0
    assert [r["env_step"] for r in rows(tmp_path / "broken")] == ["50"]
    monkeypatch.undo()
    train(compose_config([*short, f"resume={tmp_path / 'broken'}"]), tmp_path / "broken", short)
    skip = {"wall_time", "sps"}
    resumed = [{k: v for k, v in r.items() if k not in skip} for r in rows(tmp_path / "broken")]
    assert resumed == [{k: v for k, v in r.items() if k not in skip} for r in rows(tmp_path / "whole")]
    assert [r["env_step"] for r in resumed if r["episode_return"]] == ["50", "100", "150", "200"]
    assert whole.env_step == 200

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "broken"))
    events.Reload()
    assert [e.step for e in events.Scalars("episode_return")] == [50, 100, 150, 200]


# The CLI, with SAC.update poisoned at its 7th update (a subprocess: Hydra configures logging process-wide).
POISONED_CLI = """
import sys, torch
from fasttd3_lora.sac import SAC
from fasttd3_lora.train import main
update = SAC.update
def poisoned(self, batch):
    metrics = update(self, batch)
    if self.num_updates == 7:
        metrics["critic_loss"] = torch.tensor(float("nan"))
    return metrics
SAC.update = poisoned
main(sys.argv[1:])
"""


def test_resume_without_the_buffer_refills_before_updating(tmp_path: Path) -> None:
    train(compose_config([*TINY, "total_env_steps=200", "save_buffer=false"]), tmp_path, TINY)
    assert load_checkpoint(tmp_path / "checkpoints" / "latest.pt")["replay"] is None
    train(compose_config([*TINY, "save_buffer=false", f"resume={tmp_path}"]), tmp_path, TINY)
    losses = {int(r["env_step"]): r["critic_loss"] for r in rows(tmp_path) if r["episode_return"]}
    # updates ran from env_step 100 to 200; after the resume at 200 the empty buffer refills for learning_starts
    # (50 agent steps = 100 env steps) with no updates, so the episodes ending at 250 and 300 report no losses
    assert all(losses[step] for step in (150, 200)) and not any(losses[step] for step in (250, 300))


def test_nan_guard_stops_with_the_quantity_and_step_and_keeps_a_finite_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", POISONED_CLI, *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == train_mod.EXIT_NONFINITE, proc.stderr[-2000:]
    (message,) = proc.stderr.strip().splitlines()
    # update 7 is the first update of agent step 54 (updates follow agent steps 51, 52, ...): env_step 108
    assert message.startswith("fasttd3-train: non-finite critic_loss (nan) at env_step 108 (update 7): run stopped")
    assert f"last finite checkpoint {run_dir / 'checkpoints' / 'latest.pt'} (env_step 100)" in message
    latest = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert latest["meta"]["counters"]["env_step"] == 100
    assert kit.find_nonfinite(latest["agent"]) is None
    nonfinite = load_checkpoint(run_dir / "checkpoints" / "nonfinite.pt")
    assert nonfinite["meta"]["counters"]["env_step"] == 108


def test_a_non_finite_parameter_refuses_the_checkpoint() -> None:
    class Agent:
        def state_dict(self):
            return {"critic": {"blocks.0.w": torch.tensor([1.0, float("inf")])}}

    with pytest.raises(NonFiniteError, match=r"^non-finite agent state critic\.blocks\.0\.w at env_step 7$"):
        kit.checkpoint_state({}, [], Counters(env_step=7), Agent(), None, torch.Generator())


def test_crossed_marks_each_multiple_once() -> None:
    steps = range(0, 1000, 6)
    hits = [b for a, b in zip(steps, steps[1:]) if crossed(a, b, 100)]
    assert len(hits) == 9 and all(h % 100 < 6 for h in hits)


@settings(max_examples=60, deadline=None)
@given(step=st.integers(1, 64), total=st.integers(1, 3000), eval_every=st.integers(1, 500),
       checkpoint_every=st.integers(1, 500), keep=st.booleans())  # fmt: skip
def test_advance_reports_each_event_at_the_step_that_reaches_it(step, total, eval_every, checkpoint_every, keep) -> None:
    """Against brute force: an evaluation when some multiple of eval_every was reached during the step (or the run
    ends), a checkpoint likewise for checkpoint_every, for a kept evaluation, and at the end."""
    cfg = OmegaConf.create(dict(total_env_steps=total, eval_every=eval_every, checkpoint_every=checkpoint_every,
                                keep_eval_checkpoints=keep))  # fmt: skip
    counters, agent_steps = Counters(), 0
    while counters.env_step < total:
        before = counters.env_step
        end, evaluation, checkpoint = advance(counters, step, cfg)
        agent_steps += 1
        reached = range(before + 1, counters.env_step + 1)
        assert end == (counters.env_step >= total)
        assert evaluation == (any(s % eval_every == 0 for s in reached) or end)
        assert checkpoint == (any(s % checkpoint_every == 0 for s in reached) or (evaluation and keep) or end)
    assert counters.agent_step == agent_steps and counters.env_step == agent_steps * step


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CLI run killed with SIGKILL once it has checkpointed env_step 200, then resumed with `resume=<run dir>`."""
    cwd = tmp_path_factory.mktemp("cli")
    proc = cli(*TINY, "total_env_steps=600", "seed=3", "keep_eval_checkpoints=true", cwd=cwd)
    deadline = time.monotonic() + 120
    run_dir, checkpoint_step = None, 0
    while checkpoint_step < 200 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        found = list((cwd / "runs").glob("*/checkpoints/latest.pt")) if (cwd / "runs").exists() else []
        if found:
            run_dir = found[0].parents[1]
            checkpoint_step = load_checkpoint(found[0], mmap=True)["meta"]["counters"]["env_step"]
    logged = int(rows(run_dir)[-1]["env_step"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(
        [sys.executable, "-m", "fasttd3_lora.train", f"resume={run_dir}"],
        cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return {"cwd": cwd, "run_dir": run_dir, "logged": logged, "resumed": resumed}


def test_sigkill_loses_at_most_one_checkpoint_interval(killed_and_resumed: dict) -> None:
    resumed = killed_and_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    start = int(resumed.stdout.split("resumed at env_step ")[1].split(":")[0])
    assert start % 100 == 0 and start >= killed_and_resumed["logged"] - 100
    assert load_checkpoint(killed_and_resumed["run_dir"] / "checkpoints" / "latest.pt")["meta"]["counters"][
        "env_step"
    ] == 600
    assert [p.name for p in (killed_and_resumed["cwd"] / "runs").iterdir()] == [killed_and_resumed["run_dir"].name]


def test_run_dir_holds_config_metrics_events_and_checkpoint(killed_and_resumed: dict) -> None:
    run_dir = killed_and_resumed["run_dir"]
    assert run_dir.name.endswith("_dmc-cartpole-balance_lora_s3")
    config = OmegaConf.load(run_dir / "config.yaml")  # resolved: no interpolations left
    assert config.task.max_episode_steps == 50 and config.seed == 3 and config.resume == str(run_dir)
    # threads=auto followed OMP_NUM_THREADS=1 and was recorded; the resume took the recorded count
    assert config.threads == 1 and "torch threads: 1 (threads=1)" in killed_and_resumed["resumed"].stdout
    # precision=auto was resolved for this machine and recorded; the resume took the recorded value
    chosen = config.precision
    assert chosen in ("fp32", "bf16") and f"precision: {chosen} (precision={chosen})" in killed_and_resumed["resumed"].stdout
    table = rows(run_dir)
    assert METRIC_COLUMNS <= set(table[0])
    steps = [int(r["env_step"]) for r in table if r["episode_return"]]
    assert steps == list(range(50, 601, 50))  # every episode once, none twice after the resume
    assert [int(r["env_step"]) for r in table if r["eval_return"]] == [100, 200, 300, 400, 500, 600]
    assert all(float(r["critic_loss"]) > 0 for r in table if r["episode_return"] and int(r["env_step"]) > 100)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert {"episode_return", "eval_return", "critic_loss", "q_mean", "temperature"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval_return")] == [100, 200, 300, 400, 500, 600]
    latest = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert latest["replay"]["size"] == 300 and latest["meta"]["overrides"][:2] == TINY[:2]
    kept = sorted(int(p.stem.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*.pt"))
    assert kept == [100, 200, 300, 400, 500, 600]  # keep_eval_checkpoints: one per evaluation
    # stdout is a pipe, so progress comes as log lines, not a bar
    assert "env_step 600/600 (100.0%)" in killed_and_resumed["resumed"].stdout


def test_command_line_failures_exit_2_with_one_line_before_any_work(tmp_path: Path) -> None:
    """The CLI itself, in subprocesses (run concurrently: each start imports torch): a bad group option, a bad
    value and a corrupt checkpoint. The other cases go through the same `main` in-process below."""
    latest = tmp_path / "run" / "checkpoints" / "latest.pt"
    latest.parent.mkdir(parents=True)
    latest.write_bytes(b"\x80\x04 not a checkpoint")
    cases = {
        "critic=foo": "critic=foo: unknown option (allowed: lora, simbav2, sparse)",
        "algo.lr_init=-1e-4": "algo.lr_init=-0.0001: allowed a number > 0.0",
        f"resume={tmp_path / 'run'}": f"checkpoint {latest}: cannot be read (corrupt, truncated or not a torch file)",
    }
    # A buffer larger than the machine's memory is known only once the env gives the transition's size: refused
    # before it is allocated (500 TB here: 1e13 transitions x 50 B of cartpole), still in one line.
    huge = ("task=dmc/cartpole-balance", "algo.buffer_size=10000000000000", "threads=1")
    procs = {args: cli(args, cwd=tmp_path) for args in cases}
    (tmp_path / "huge").mkdir()
    procs[huge] = cli(*huge, cwd=tmp_path / "huge")
    cases[huge] = "algo.buffer_size=10000000000000: replay buffer needs 500,000,000,000,000 B (465661.29 GiB = 10000000000000 transitions x 50 B)"
    for args, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (args, err)
        (line,) = err.strip().splitlines()
        assert line.startswith(f"fasttd3-train: {cases[args]}"), (args, err)
    assert not (tmp_path / "runs").exists()  # nothing was started


NEEDS_NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ("task=dmc/chetah-run", "task=dmc/chetah-run: unknown option; did you mean dmc/cheetah-run"),
        ("critic.rank=600", "critic.rank=600: allowed an integer in [1, 512]"),
        ("total_env_steps=-10", "total_env_steps=-10: allowed an integer >= 1"),
        ("threads=0", "threads=0: allowed an integer >= 1 or auto"),
        ("algo.batch_size=4096 algo.buffer_size=1000", "algo.batch_size=4096: allowed at most algo.buffer_size (1000)"),
        ("total_env_step=5", "total_env_step: no such config key; did you mean total_env_steps?"),
        ("-m resume=runs/x", "resume=runs/x: not allowed with --multirun"),
        ("resume=no/such/run", "resume=no/such/run: no such run directory or checkpoint file"),
        ("resume=FOREIGN", "not a fasttd3-lora-checkpoint file"),
        pytest.param("device=cuda", "device=cuda: no CUDA device is available on this machine (allowed here: cpu)",
                     marks=NEEDS_NO_CUDA),
        pytest.param("device=cuda:3", "device=cuda:3: no CUDA device is available", marks=NEEDS_NO_CUDA),
        pytest.param("device=mps", "device=mps: no MPS device is available on this machine",
                     marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
    ],
)
def test_main_refuses_bad_command_lines_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, args: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.ones(2)}, foreign)
    with pytest.raises(SystemExit) as info:
        train_mod.main(args.replace("FOREIGN", str(foreign)).split())
    assert info.value.code == train_mod.EXIT_CONFIG
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fasttd3-train: ") and expected in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------- command-line preparation


def test_default_command_line_is_a_fresh_cheetah_lora_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (run_dir_arg,) = prepare_command_line([])  # `make train`: no arguments
    key, value = run_dir_arg.split("=", 1)
    assert key == "hydra.run.dir" and value.startswith("'runs/") and value.endswith("_dmc-cheetah-run_lora_s0'")


def test_a_new_run_never_reuses_an_existing_directory(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "2026-01-01_00-00-00_dmc-walker-walk_lora_s1"
    assert train_mod._fresh_dir(run) == run
    run.mkdir(parents=True)
    assert train_mod._fresh_dir(run) == run.with_name(run.name + "_2")
    run.with_name(run.name + "_2").mkdir()
    assert train_mod._fresh_dir(run) == run.with_name(run.name + "_3")


def test_a_sweep_gets_a_fresh_directory(tmp_path: Path) -> None:
    taken = tmp_path / "sweep"
    taken.mkdir()
    argv = prepare_command_line(["-m", "seed=0,1", f"hydra.sweep.dir={taken}"])
    assert argv == ["-m", "seed=0,1", f"hydra.sweep.dir={taken}", f"hydra.sweep.dir='{taken}_2'"]


def test_resume_reuses_the_run_dir_and_its_overrides(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    resolved = OmegaConf.to_container(drop_unused_groups(compose_config(TINY)), resolve=True)  # as runs save it
    save_checkpoint(run_dir / "checkpoints" / "latest.pt", {"meta": {"config": resolved, "overrides": TINY}})
    argv = prepare_command_line([f"resume={run_dir}", "total_env_steps=800"])
    kept = [o for o in TINY if o != "total_env_steps=300"]
    assert argv[:-1] == [*kept, f"resume={run_dir}", "total_env_steps=800"]
    assert argv[-1] == f"hydra.run.dir='{run_dir.resolve()}'"
    # critic.alpha follows critic.rank, so the first key that differs (in sorted order) is the alpha
    with pytest.raises(ConfigError, match=r"^critic\.alpha=16: a resumed run must keep the checkpoint's value 8"):
        prepare_command_line([f"resume={run_dir}", "critic.rank=16"])
    with pytest.raises(ConfigError, match=r"^critic\.rank=16: a resumed run must keep the checkpoint's value 8"):
        prepare_command_line([f"resume={run_dir}", "critic.rank=16", "critic.alpha=8"])
    with pytest.raises(ConfigError, match="not allowed with --multirun"):
        prepare_command_line(["-m", f"resume={run_dir}"])


# --------------------------------------------------------------------------------------------- logging sinks


def test_metrics_csv_grows_its_header_and_drops_rows_past_a_resume(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    log = MetricsCSV(path)
    log.write({"env_step": 10, "wall_time": 1.0, "episode_return": 5.0})
    log.write({"env_step": 20, "wall_time": 2.0, "eval_return": 7.0})
    log.write({"env_step": 30, "wall_time": 3.0, "episode_return": 6.0})
    log.close()
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["env_step", "wall_time", "episode_return", "eval_return"]
    assert [(r["env_step"], r["episode_return"], r["eval_return"]) for r in table] == [
        ("10", "5.0", ""), ("20", "", "7.0"), ("30", "6.0", ""),
    ]  # fmt: skip
    MetricsCSV(path, keep_until=20).close()
    with open(path, newline="") as f:
        assert [r["env_step"] for r in csv.DictReader(f)] == ["10", "20"]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() -> None:
    now = [0.0]
    lines = io.StringIO()
    progress = Progress(1000, 0, stream=lines, interval_s=30, clock=lambda: now[0])
    now[0] = 10.0
    progress.update(100)
    assert lines.getvalue() == ""  # nothing until the interval passes or an evaluation arrives
    early = io.StringIO()
    Progress(1000, 0, stream=early, clock=lambda: now[0]).update(0, eval_return=1.0)  # e.g. right after a resume
    assert early.getvalue() == "env_step 0/1000 (0.0%) | ? SPS | ETA ? | eval return 1.0\n"  # no "nan SPS"
    now[0] = 40.0
    progress.update(200)  # 200 steps in 40 s
    progress.update(200, eval_return=12.34)  # an evaluation: a line at once, same SPS
    assert lines.getvalue().splitlines() == [
        "env_step 200/1000 (20.0%) | 5 SPS | ETA 0:02:40",
        "env_step 200/1000 (20.0%) | 5 SPS | ETA 0:02:40 | eval return 12.3",
    ]
    progress.close()  # the last step was already reported: no repeat
    assert len(lines.getvalue().splitlines()) == 2
    terminal = _Tty()
    now[0] = 0.0
    bar = Progress(1000, 0, stream=terminal, clock=lambda: now[0])
    now[0] = 10.0
    bar.update(500, eval_return=3.0)
    bar.close()
    text = terminal.getvalue()
    assert "\r" in text and "500/1.00k" in text and "SPS=50" in text and "eval=3.0" in text


def test_the_eta_is_the_learning_phases_rate_not_the_warm_ups() -> None:
    """`make train`'s case: 10k random env steps at ~300/s, then learning at ~5/s. The ETA says so during the
    warm-up, then extrapolates the learning phase alone, and does not swing with each evaluation."""
    now, lines = [0.0], io.StringIO()
    progress = Progress(1_000_000, 0, stream=lines, interval_s=30, learning_from=10_000, clock=lambda: now[0])
    for t, step in ((30.0, 9_000), (33.4, 10_000), (63.4, 10_150), (93.4, 10_300), (123.4, 10_380), (153.4, 10_600)):
        now[0] = t
        progress.update(step)
    etas = [line.split("| ETA ")[1] for line in lines.getvalue().splitlines()]
    assert etas[0] == "after warm-up"
    hours = [sum(int(x) * 60**k for k, x in enumerate(reversed(e.split(":")))) / 3600 for e in etas[1:]]
    # learning ran 600 env steps in 120 s (5/s): ~55 h for the 989,400 left; never the warm-up's ~1 h
    assert hours[-1] == pytest.approx(989_400 / 5 / 3600, rel=0.01)
    assert min(hours) > 40 and max(hours) / min(hours) < 2  # one evaluation's slow interval does not swing it
    now[0], resumed = 0.0, io.StringIO()
    after = Progress(1_000_000, 500_000, stream=resumed, interval_s=30, learning_from=10_000, clock=lambda: now[0])
    now[0] = 30.0
    after.update(500_150)  # a resumed run is in its learning phase from the start
    assert resumed.getvalue().endswith("| ETA 27:46:10\n")  # 499,850 left at 5 per s


def test_wandb_offline_writes_a_local_run_and_touches_no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every HTTP(S) request not to localhost would go through this "proxy": it counts connections.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    connections: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                connections.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    proxy = f"http://127.0.0.1:{server.getsockname()[1]}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, proxy)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    try:
        logger = RunLogger(tmp_path, config={"seed": 0}, wandb={"project": "test", "entity": None, "mode": "offline"})
        logger.log(10, 1.0, {"episode_return": 3.0})
        logger.log(20, 2.0, {"eval_return": 4.0})
        logger.close()
    finally:
        stop.set()
        thread.join()
        server.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    assert connections == []
