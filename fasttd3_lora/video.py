"""Videos of a policy: headless OpenGL for MuJoCo, frames to mp4 and to a TensorBoard GIF (docs/training.md,
"Videos"; `fasttd3_lora.play`).

MuJoCo picks its OpenGL backend from ``MUJOCO_GL`` when it is first imported, so `prepare_rendering()` runs before
any DMC env is built: it keeps a ``MUJOCO_GL`` the user set (egl, osmesa, glfw), else tries EGL and then OSMesa,
each in a child process (a missing driver can crash the process that tries it), and fails with one line naming
what to install when neither renders. Triton is imported first when installed: on these machines ``MUJOCO_GL=egl``
followed by dm_control and then ``import triton`` segfaults the process (DESIGN §9), the other order does not.

Frames are (height, width, 3) uint8 arrays. `write_mp4` encodes with imageio's bundled ffmpeg (the `video` extra);
`gif_summary` is the TensorBoard image summary of an animated GIF (TensorBoard plays it; torch's own `add_video`
needs moviepy 1.x).
"""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fasttd3_lora.checks import ConfigError

__all__ = ["VideoError", "GL_BACKENDS", "prepare_rendering", "write_mp4", "gif_summary"]

GL_BACKENDS = ("egl", "osmesa")
_PROBE = ("from dm_control import suite; env = suite.load('cartpole', 'balance'); env.reset(); "
          "assert env.physics.render(16, 16, camera_id=0).shape == (16, 16, 3)")  # fmt: skip


class VideoError(ConfigError):
    """Videos cannot be made here; the message is one line and says what would fix it (exit 2, as a bad config)."""


def _renders(backend: str) -> bool:
    env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    try:
        return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def prepare_rendering() -> str:
    """Choose MuJoCo's OpenGL backend for this process (module docstring) and return it; raises `VideoError`."""
    chosen = os.environ.get("MUJOCO_GL", "")
    if chosen not in ("egl", "osmesa", "glfw"):
        if "dm_control" in sys.modules or "mujoco" in sys.modules:
            raise VideoError("videos: MuJoCo was imported before a renderer was chosen (MUJOCO_GL="
                             f"{chosen or 'unset'}); set MUJOCO_GL=egl or osmesa before starting")  # fmt: skip
        chosen = next((backend for backend in GL_BACKENDS if _renders(backend)), "")
        if not chosen:
            raise VideoError("videos: MuJoCo cannot render here, neither EGL nor OSMesa works (install libegl1 or "
                             "libosmesa6, or set MUJOCO_GL), or play without video=true")  # fmt: skip
        os.environ["MUJOCO_GL"] = os.environ["PYOPENGL_PLATFORM"] = chosen
    if importlib.util.find_spec("triton") is not None and "triton" not in sys.modules:
        import triton  # noqa: F401  (before dm_control: the other order segfaults under EGL)
    return chosen


def _imageio() -> Any:
    try:
        import imageio
    except ImportError:
        raise VideoError("videos: imageio is not installed (pip install 'fasttd3-lora[video]')") from None
    return imageio


def write_mp4(path: str | Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Encode `frames` as an H.264 mp4 at `fps` (written to a temporary name, then renamed)."""
    if not frames:
        raise VideoError(f"{path}: no frames to write")
    imageio = _imageio()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    try:
        imageio.mimwrite(tmp, [np.asarray(f, dtype=np.uint8) for f in frames], fps=fps, macro_block_size=1)
    except (RuntimeError, OSError) as err:  # no ffmpeg: imageio-ffmpeg's bundled binary is missing
        tmp.unlink(missing_ok=True)
        raise VideoError(f"{path}: cannot encode mp4 ({str(err).splitlines()[0]}); pip install imageio-ffmpeg") from None
    os.replace(tmp, path)
    return path


def gif_summary(tag: str, frames: Sequence[np.ndarray], fps: float) -> Any:
    """A TensorBoard `Summary` holding the frames as one animated GIF image."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    imageio = _imageio()
    buffer = io.BytesIO()
    imageio.mimwrite(buffer, [np.asarray(f, dtype=np.uint8) for f in frames], format="GIF", duration=1000.0 / fps, loop=0)
    height, width = frames[0].shape[:2]
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=image)])
