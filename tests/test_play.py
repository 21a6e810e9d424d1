"""Watching a policy (fasttd3_lora/play.py, fasttd3_lora/video.py): play on a real short DMC run (returns, an mp4
of the first episode), training-time evaluation videos (mp4, TensorBoard GIF), Isaac Lab through the stand-in,
and one-line errors where videos cannot be made. Rendering DMC needs MuJoCo's EGL or OSMesa: without either on
the machine those tests are skipped (the error path is tested either way)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttd3_lora import video as video_module
from fasttd3_lora.config import compose_config
from fasttd3_lora.play import main as play_main
from fasttd3_lora.play import play
from fasttd3_lora.runner import train
from fasttd3_lora.tasks import isaaclab
from fasttd3_lora.tasks.isaaclab import IsaacLabEnv
from fasttd3_lora.video import VideoError, gif_summary, prepare_rendering, write_mp4

import isaaclab_standin as standin

iio = pytest.importorskip("imageio.v3")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("MUJOCO_GL", None)
GL = next((b for b in video_module.GL_BACKENDS if video_module._renders(b)), None)
needs_gl = pytest.mark.skipif(GL is None, reason="no EGL or OSMesa for MuJoCo on this machine")
# 4 envs, 20-step episodes (cartpole at action repeat 1), 2 iterations of 40 env steps, eval after each
PPO = ["algo=ppo", "task=dmc/cartpole-balance", "task.max_episode_steps=20", "algo.action_repeat=1",
       "algo.num_envs=4", "algo.num_steps=10", "algo.num_minibatches=2", "algo.actor_hidden_dims=[16]",
       "algo.critic_hidden_dims=[16]", "total_env_steps=80", "eval_every=40", "checkpoint_every=80",
       "eval_episodes=2", "precision=fp32"]  # fmt: skip


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real short PPO run made by the app in a fresh process (MuJoCo picks its renderer at first import), with
    an evaluation video every second evaluation when the machine can render."""
    cwd = tmp_path_factory.mktemp("run")
    video = ["video.every=2", "video.height=48", "video.width=64"] if GL else []
    proc = _run(["-m", "fasttd3_lora.train", *PPO, *video, "hydra.run.dir=run"], cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "run"


@needs_gl
def test_training_logs_a_video_of_an_evaluation_episode(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == ["eval_80.mp4"]  # the 2nd of 2 evaluations
    frames = iio.imread(run_dir / "videos" / "eval_80.mp4")
    assert frames.shape == (21, 48, 64, 3)  # the reset and 20 steps of the first episode
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("eval_video")
    gif = iio.imread(io.BytesIO(image.encoded_image_string), extension=".gif")
    assert image.step == 80 and 2 <= len(gif) <= 21 and gif.shape[1:3] == (48, 64)  # GIF merges repeated frames


@needs_gl
def test_play_prints_returns_and_writes_the_first_episode(run_dir, tmp_path):
    proc = _run(["-m", "fasttd3_lora.play", str(run_dir), "episodes=3", "video=true", "height=32", "width=40",
                 f"out={tmp_path / 'p.mp4'}"], tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["episode 0", "episode 1", "episode 2"]
    assert lines[3].startswith("mean return") and lines[4] == f"video of episode 0: {tmp_path / 'p.mp4'}"
    assert iio.imread(tmp_path / "p.mp4").shape == (21, 32, 40, 3)


def test_play_without_video_gives_the_deterministic_returns_twice(run_dir):
    first, none = play(run_dir, episodes=2)
    second, _ = play(run_dir, episodes=2)
    assert none is None and len(first) == 2 and first == second and all(0 < r <= 20 for r in first)


def test_play_command_line_errors_are_one_line(run_dir, tmp_path, capsys):
    for args, message in (([], "expected one run directory, got 0"), ([str(run_dir), "episodes=0"], "episodes=0"),
                          ([str(run_dir), "video=maybe"], "video=maybe: allowed true or false"),
                          ([str(tmp_path)], "the directory has no checkpoints/latest.pt")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            play_main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_isaaclab_play_records_the_viewport_through_render_mode(run_dir, tmp_path, monkeypatch):
    """The stand-in as Isaac Lab: a PPO checkpoint of it is played with video=true."""
    made = []

    def factory(name, num_envs, seed, device, physics, headless, render=False) -> IsaacLabEnv:
        made.append(render)
        env = standin.make_standin(num_envs, 3, seed=seed, final_obs=True, render_mode="rgb_array" if render else None)
        return IsaacLabEnv(env, task="standin")

    monkeypatch.setattr(isaaclab, "make_isaaclab_env", factory)
    overrides = ["algo=ppo", "task=Isaac-Velocity-Flat-H1-v0", "algo.num_envs=8", "algo.num_steps=4",
                 "algo.actor_hidden_dims=[8]", "algo.critic_hidden_dims=[8]", "total_env_steps=64",
                 "eval_every=1000", "checkpoint_every=1000", "precision=fp32"]  # fmt: skip
    torch.set_num_threads(1)
    train(compose_config(overrides), tmp_path / "isaac", overrides)
    returns, written = play(tmp_path / "isaac", episodes=2, video=True)
    assert made[-1] is True and len(returns) == 2
    frames = iio.imread(written)
    assert frames.shape[1:] == (48, 64, 3) and 2 <= len(frames) <= 41  # the reset, then until env 0's episode ends


def test_no_renderer_is_one_line_naming_what_to_install(monkeypatch):
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.setattr(video_module, "_renders", lambda backend: False)
    monkeypatch.delitem(sys.modules, "dm_control", raising=False)
    monkeypatch.delitem(sys.modules, "mujoco", raising=False)
    with pytest.raises(VideoError, match=r"^videos: MuJoCo cannot render here, neither EGL nor OSMesa works \(install"):
        prepare_rendering()


def test_mp4_and_gif_hold_the_frames(tmp_path):
    frames = [np.full((16, 24, 3), 10 * i, dtype=np.uint8) for i in range(12)]
    assert iio.imread(write_mp4(tmp_path / "v.mp4", frames, fps=25)).shape == (12, 16, 24, 3)
    summary = gif_summary("clip", frames, fps=25)
    (value,) = summary.value
    assert value.tag == "clip" and (value.image.height, value.image.width) == (16, 24)
    assert len(iio.imread(io.BytesIO(value.image.encoded_image_string), extension=".gif")) == 12
    with pytest.raises(VideoError, match="no frames"):
        write_mp4(tmp_path / "empty.mp4", [], fps=25)
