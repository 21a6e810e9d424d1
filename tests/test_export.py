"""ONNX export (DESIGN §8): a short real DMC run of the app is exported and checked against PyTorch, in
onnxruntime and in a rollout; hand-built SAC (dense, sparse critics) and FastTD3 checkpoints; the CLI's errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from omegaconf import OmegaConf  # noqa: E402
from torchrl.data import Bounded, Composite, Unbounded  # noqa: E402

from fasttd3_lora.checkpoint import FORMAT, VERSION, load_checkpoint, save_checkpoint  # noqa: E402
from fasttd3_lora.config import compose_config  # noqa: E402
from fasttd3_lora.export import (  # noqa: E402
    METADATA_KEYS,
    DeployPolicy,
    ExportError,
    export_checkpoint,
    main,
    read_metadata,
    sample_observations,
    verify_onnx,
)
from fasttd3_lora.networks import DeterministicActor  # noqa: E402
from fasttd3_lora.normalization import RunningMeanStd  # noqa: E402
from fasttd3_lora.tasks.dmc import DMCEnv  # noqa: E402
from fasttd3_lora.envs import env_deploy_facts  # noqa: E402
from fasttd3_lora.loops import sac as sac_loop  # noqa: E402
from fasttd3_lora.loops.kit import Counters, checkpoint_state, evaluate  # noqa: E402
from fasttd3_lora.sac import SACConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASK = "dmc/cartpole-balance"
# A real run of the app, as small as it gets: 50 agent steps, 20 of them learning (40 updates), tiny networks.
# fp32: the comparisons below hold the exported fp32 graph to 1e-5 of the agent's own `act`, which under bf16
# autocast (precision=auto picks it on CPUs with avx512_bf16) differs from fp32 by bf16 rounding (~4e-3).
TINY = [
    f"task={TASK}", "total_env_steps=100", "algo.learning_starts=30", "algo.batch_size=16",
    "scale.critic_hidden_dim=32", "scale.critic_num_blocks=1", "algo.actor_hidden_dim=16", "critic.rank=8",
    "critic.alpha=8", "eval_episodes=1", "eval_every=100", "checkpoint_every=100", "save_buffer=false",
    "precision=fp32",
]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MUJOCO_GL": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "fasttd3_lora.train", *TINY], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = (cwd / "runs").iterdir()
    return run


@pytest.fixture(scope="module")
def exported(run_dir: Path):
    return export_checkpoint(run_dir)


@pytest.fixture(scope="module")
def session(exported):
    return ort.InferenceSession(str(exported.policy_path), providers=["CPUExecutionProvider"])


def _sac_agent(run_dir: Path):
    """The training app's own agent, restored from the run's checkpoint: the PyTorch reference."""
    state = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    cfg = OmegaConf.create(state["meta"]["config"])
    env = DMCEnv(TASK, 1, action_repeat=cfg.algo.action_repeat, max_episode_steps=cfg.task.max_episode_steps)
    obs_dim, act_dim = env.observation_spec["observation"].shape[-1], env.action_spec.shape[-1]
    agent, _ = sac_loop.build(SACConfig.from_hydra(cfg), obs_dim, act_dim, 100, torch.device("cpu"), torch.Generator().manual_seed(0))
    agent.load_state_dict(state["agent"])
    return agent, env, state


class OnnxAgent:
    """`act` of the exported model, for the app's own evaluation loop."""

    def __init__(self, session) -> None:
        self.session = session

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        assert deterministic
        (actions,) = self.session.run(["actions"], {"obs": obs.numpy().astype(np.float32)})
        return torch.from_numpy(actions)


# --- the real run ---------------------------------------------------------------------------------


def test_onnxruntime_matches_the_agent_on_1000_observations(run_dir, exported, session):
    agent, env, state = _sac_agent(run_dir)
    env.close()
    rms = RunningMeanStd(agent.obs_rms.shape)
    rms.load_state_dict(state["agent"]["obs_rms"])
    obs = sample_observations(rms, rms.shape[0], 1000, torch.Generator().manual_seed(123))
    (onnx_actions,) = session.run(["actions"], {"obs": obs.numpy()})
    with torch.no_grad():
        torch_actions = agent.act(obs, deterministic=True).numpy()
    assert onnx_actions.shape == (1000, 1)
    assert np.abs(onnx_actions - torch_actions).max() <= 1e-5
    assert exported.max_abs_diff <= 1e-5
    # The samples follow the run's statistics, so the check covers the inputs the policy was trained on.
    assert torch.allclose(obs.mean(0), rms.mean, atol=0.15 * rms.var.sqrt().max().item())
    assert torch.allclose(obs.std(0), rms.var.sqrt(), rtol=0.15) and np.ptp(torch_actions) > 0


def test_onnx_policy_rollout_returns_what_the_pytorch_policy_returns(run_dir, session):
    agent, env, _ = _sac_agent(run_dir)
    with env:
        torch_return, _ = evaluate(agent, env, seed=7)
        onnx_return, _ = evaluate(OnnxAgent(session), env, seed=7)
    assert torch_return > 0
    assert abs(onnx_return - torch_return) <= 1e-3 * max(1.0, abs(torch_return))


def test_deploy_yaml_round_trips_and_matches_the_run(run_dir, exported):
    deploy = yaml.safe_load(exported.deploy_path.read_text())
    assert deploy == exported.metadata == read_metadata(exported.policy_path)
    assert exported.policy_path.parent == run_dir / "export"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    counters = load_checkpoint(run_dir / "checkpoints" / "latest.pt")["meta"]["counters"]
    assert (deploy["task"], deploy["algo"], deploy["critic"], deploy["seed"]) == (
        config["task"]["name"], config["algo"]["name"], config["critic"]["kind"], config["seed"])  # fmt: skip
    assert deploy["training"] == {"env_step": counters["env_step"], "agent_step": counters["agent_step"]}
    assert deploy["training"]["env_step"] == 100 and deploy["actor"] == "TanhGaussianActor"
    with DMCEnv(TASK, 1, action_repeat=config["algo"]["action_repeat"]) as env:
        assert deploy["control_period_s"] == pytest.approx(env.control_period)
        assert deploy["observation"]["layout"] == [
            {"name": k, "shape": list(s), "start": 3 * (k == "velocity"), "size": int(np.prod(s))}
            for k, s in env.observation_layout()
        ]
        assert deploy["action"]["joint_names"] == env.joint_names
        assert deploy["action"]["scale"] == env.action_scale.tolist()
        assert deploy["action"]["offset"] == env.action_offset.tolist()
    assert deploy["observation"]["dim"] == 5 and deploy["action"]["dim"] == 1
    assert deploy["action"]["clip"] == {"low": [-1.0], "high": [1.0]}
    assert deploy["verification"]["num_obs"] == 1000 and deploy["verification"]["tolerance"] == 1e-4


def test_model_inputs_outputs_and_metadata_are_what_the_docs_promise(exported):
    model = onnx.load(str(exported.policy_path))
    assert {o.domain: o.version for o in model.opset_import}[""] == 18
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("obs", "actions")
    for value, width in ((inp, 5), (out, 1)):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        batch, feature = value.type.tensor_type.shape.dim
        assert batch.dim_param and not batch.HasField("dim_value") and feature.dim_value == width
    assert tuple(p.key for p in model.metadata_props) == METADATA_KEYS
    docs = (ROOT / "docs" / "deploy.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", docs, flags=re.M))
    assert set(METADATA_KEYS) <= documented
    assert "`obs`" in docs and "`actions`" in docs and "opset 18" in docs


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 64), scale=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_dynamic_batch_matches_pytorch_for_any_batch_and_magnitude(exported, session, batch, scale, seed):
    policy = _policy_of(exported)
    obs = scale * torch.randn(batch, 5, generator=torch.Generator().manual_seed(seed))
    (actions,) = session.run(["actions"], {"obs": obs.numpy()})
    with torch.no_grad():
        expected = policy(obs).numpy()
    assert actions.shape == (batch, 1) and np.abs(actions - expected).max() <= 1e-5


_POLICIES: dict[Path, DeployPolicy] = {}


def _policy_of(exported) -> DeployPolicy:
    from fasttd3_lora.export import policy_from_checkpoint

    path = exported.policy_path
    if path not in _POLICIES:
        ckpt = path.parent.parent / "checkpoints" / "latest.pt"
        _POLICIES[path] = policy_from_checkpoint(load_checkpoint(ckpt), ckpt, 5, 1)
    return _POLICIES[path]


def test_verification_fails_when_the_model_disagrees(exported):
    policy = _policy_of(exported)
    perturbed = DeployPolicy(policy.actor, RunningMeanStd(5), 5)  # same actor, normaliser not folded
    obs = sample_observations(policy.obs_normalizer, 5, 100, torch.Generator().manual_seed(0))
    with pytest.raises(ExportError, match="differ by .* > tolerance 0.0001"):
        verify_onnx(exported.policy_path, perturbed, obs)


# --- hand-built checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize("critic", ["simbav2", "sparse"])
def test_sac_checkpoints_of_dense_and_sparse_runs_export(tmp_path, critic):
    overrides = [f"task={TASK}", f"critic={critic}", "scale.critic_hidden_dim=32", "scale.critic_num_blocks=1",
                 "algo.actor_hidden_dim=16", "seed=3", "precision=fp32"]  # fmt: skip
    cfg = compose_config(overrides)
    generator = torch.Generator().manual_seed(3)
    agent, replay = sac_loop.build(SACConfig.from_hydra(cfg), 5, 1, 100, torch.device("cpu"), generator)
    agent.obs_rms.update(torch.randn(64, 5) * 2 + 1)
    state = checkpoint_state(OmegaConf.to_container(cfg, resolve=True), overrides, Counters(env_step=40, agent_step=20),
                             agent, None, generator)  # fmt: skip
    save_checkpoint(tmp_path / "ckpt.pt", state)
    result = export_checkpoint(tmp_path / "ckpt.pt", tmp_path / "out")
    assert result.metadata["critic"] == critic and result.metadata["training"]["env_step"] == 40
    obs = torch.randn(50, 5) * 3
    (actions,) = ort.InferenceSession(str(result.policy_path)).run(["actions"], {"obs": obs.numpy()})
    with torch.no_grad():
        assert np.abs(actions - agent.act(obs, deterministic=True).numpy()).max() <= 1e-5


def _fasttd3_checkpoint(path: Path, *, joints: list[str] | None) -> tuple[DeterministicActor, RunningMeanStd]:
    """A FastTD3 checkpoint as its agent will write it (issue 4): DeterministicActor, obs_rms, meta.env recorded
    by the app (Isaac Lab-like: joint names, a 0.5 action scale around default joint positions)."""
    obs_dim, act_dim = 9, 3
    torch.manual_seed(5)
    actor = DeterministicActor(obs_dim, act_dim, 24, 1)
    rms = RunningMeanStd(obs_dim)
    rms.update(torch.randn(256, obs_dim) * torch.linspace(0.5, 4.0, obs_dim) + 2.0)
    env = SimpleNamespace(
        observation_spec=Composite(observation=Unbounded(shape=(4, obs_dim)), shape=(4,)),
        action_spec=Bounded(low=-1.0, high=1.0, shape=(4, act_dim)),
        action_scale=torch.full((act_dim,), 0.5),
        action_offset=torch.tensor([0.1, -0.2, 0.3]),
        joint_names=joints,
        control_period=0.02,
        observation_layout=lambda: [("base_lin_vel", (3,)), ("joint_pos", (3,)), ("joint_vel", (3,))],
    )
    config = {"task": {"name": "Isaac-Velocity-Flat-H1-v0", "family": "isaaclab"}, "seed": 1,
              "algo": {"name": "fasttd3", "actor_hidden_dim": 24, "actor_num_blocks": 1},
              "critic": {"kind": "lora"}}  # fmt: skip
    save_checkpoint(path, {
        "meta": {"config": config, "overrides": [], "counters": {"env_step": 4096, "agent_step": 1},
                 "env": env_deploy_facts(env)},
        "agent": {"actor": actor.state_dict(), "obs_rms": rms.state_dict()},
    })  # fmt: skip
    return actor, rms


def test_fasttd3_deterministic_actor_checkpoint_exports_with_joint_names(tmp_path):
    joints = ["left_hip_yaw", "right_hip_yaw", "torso"]
    actor, rms = _fasttd3_checkpoint(tmp_path / "fasttd3.pt", joints=joints)
    result = export_checkpoint(tmp_path / "fasttd3.pt")
    assert result.policy_path.parent == tmp_path  # a loose checkpoint exports next to itself
    meta = yaml.safe_load(result.deploy_path.read_text())
    assert meta["actor"] == "DeterministicActor" and meta["algo"] == "fasttd3"
    assert meta["action"]["joint_names"] == joints
    assert meta["action"]["scale"] == [0.5] * 3
    assert meta["action"]["offset"] == pytest.approx([0.1, -0.2, 0.3])
    assert [e["name"] for e in meta["observation"]["layout"]] == ["base_lin_vel", "joint_pos", "joint_vel"]
    assert meta["control_period_s"] == 0.02 and meta["training"]["env_step"] == 4096
    obs = rms.mean + rms.var.sqrt() * torch.randn(200, 9)
    (actions,) = ort.InferenceSession(str(result.policy_path)).run(["actions"], {"obs": obs.numpy()})
    with torch.no_grad():
        expected = actor(rms.normalize(obs)).numpy()
    assert np.abs(actions - expected).max() <= 1e-5


def test_env_deploy_facts_validates_what_the_env_says():
    env = SimpleNamespace(
        observation_spec=Composite(observation=Unbounded(shape=(2, 4)), shape=(2,)),
        action_spec=Bounded(low=-0.5, high=1.0, shape=(2, 2)),
        action_scale=None, action_offset=None, control_period=None,
        joint_names=lambda: ["a", "b"], observation_layout=lambda: [("p", (2, 2))],
    )  # fmt: skip
    facts = env_deploy_facts(env)
    assert facts["action"] == {"dim": 2, "scale": [1.0, 1.0], "offset": [0.0, 0.0],
                               "clip": {"low": [-0.5, -0.5], "high": [1.0, 1.0]}, "joint_names": ["a", "b"],
                               "map_known": True, "moving_average": None}  # fmt: skip
    assert facts["observation"]["layout"] == [{"name": "p", "shape": [2, 2], "start": 0, "size": 4}]
    assert facts["control_period_s"] is None
    env.joint_names = ["a"]
    with pytest.raises(ValueError, match="1 joints for 2 action dimensions"):
        env_deploy_facts(env)
    env.joint_names, env.observation_layout = None, lambda: [("p", (3,))]
    with pytest.raises(ValueError, match="covers 3 values, observations have 4"):
        env_deploy_facts(env)
    env.observation_layout = lambda: None  # an env without an observation manager
    assert env_deploy_facts(env)["observation"]["layout"] is None


# --- command line -----------------------------------------------------------------------------------


class Foreign:
    """Pickled into a file: a weights_only load must refuse to build it (unpickling would set `built`)."""

    built = False

    def __setstate__(self, state: dict) -> None:
        Foreign.built = True


def _cli_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fasttd3-export: ")
    return err


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert "no such run directory or checkpoint" in _cli_error(capsys, str(tmp_path / "missing"))
    assert "without checkpoints/latest.pt" in _cli_error(capsys, str(tmp_path))
    # The checkpoint module words these; here: one line, naming the file, exit 2.
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    assert "notes.pt" in _cli_error(capsys, str(tmp_path / "notes.pt"))
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    assert "foreign.pt" in _cli_error(capsys, str(tmp_path / "foreign.pt"))
    foreign = Foreign()
    foreign.payload = 1
    torch.save({"format": FORMAT, "version": VERSION, "x": foreign}, tmp_path / "pickled.pt")
    assert "pickled.pt" in _cli_error(capsys, str(tmp_path / "pickled.pt"))
    assert not Foreign.built  # loaded with weights_only=True: the object was never constructed
    save_checkpoint(tmp_path / "dreamer.pt", {"meta": {"config": {"algo": {"name": "dreamer"}}}, "agent": {}})
    assert "algo.name='dreamer' has no exportable actor" in _cli_error(capsys, str(tmp_path / "dreamer.pt"))
    _fasttd3_checkpoint(tmp_path / "ok.pt", joints=None)
    assert "unknown option outdir=" in _cli_error(capsys, str(tmp_path / "ok.pt"), "outdir=x")
    assert "expected one run directory or checkpoint, got 0" in _cli_error(capsys)


def test_cli_writes_to_out_and_prints_the_difference(tmp_path, capsys):
    _fasttd3_checkpoint(tmp_path / "ok.pt", joints=None)
    main([str(tmp_path / "ok.pt"), f"out={tmp_path / 'deploy'}"])
    out = capsys.readouterr().out
    assert (tmp_path / "deploy" / "policy.onnx").is_file() and (tmp_path / "deploy" / "deploy.yaml").is_file()
    diff = float(re.search(r"max abs difference (\S+) over 1000 observations", out).group(1))
    assert 0 <= diff <= 1e-4
    assert yaml.safe_load((tmp_path / "deploy" / "deploy.yaml").read_text())["action"]["joint_names"] is None


def test_a_model_that_fails_its_check_is_not_left_behind(tmp_path):
    _fasttd3_checkpoint(tmp_path / "ok.pt", joints=None)
    # float32 onnxruntime and PyTorch never agree to 1e-12 on 1000 observations: the check fails.
    with pytest.raises(ExportError, match="> tolerance 1e-12"):
        export_checkpoint(tmp_path / "ok.pt", tmp_path / "out", tolerance=1e-12)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("workflow", ["manager", "direct"])
def test_isaaclab_deploy_facts_carry_the_action_terms_map(workflow: str) -> None:
    """deploy.yaml's command formula reproduces the joint command the Isaac Lab action term computes (stand-in env
    with Isaac Lab's attributes: a joint-position term around default joint positions, or the in-hand tasks'
    joint-limit map with a moving average)."""
    from isaaclab_standin import make_standin

    from fasttd3_lora.tasks.isaaclab import IsaacLabEnv

    gym_env = make_standin(4, 3, workflow=workflow, action_offset=0.2, act_moving_average=0.5)
    env = IsaacLabEnv(gym_env, task="standin")
    facts = env_deploy_facts(env)["action"]
    td = env.reset()
    actions = torch.tensor([[-2.0, 0.3, 0.9]]).expand(4, 3)
    env.step(td.set("action", actions))
    command = torch.tensor(facts["offset"]) + torch.tensor(facts["scale"]) * actions.clamp(-1, 1)
    m = torch.tensor(facts["moving_average"] or [1.0] * 3)  # per action dimension
    torch.testing.assert_close(gym_env.unwrapped.processed_actions, m * command)  # previous target was 0
    assert facts["map_known"] and (facts["moving_average"] is None) == (workflow == "manager")
