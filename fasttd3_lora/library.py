"""The policy library command line (DESIGN §10; docs/library.md): one frozen base policy, one LoRA adapter per task.

    python -m fasttd3_lora.library create LIB --base RUN_DIR     a finished PPO run's policy becomes the base
    python -m fasttd3_lora.library list LIB                      tasks, ranks, sizes against a full copy, returns
    python -m fasttd3_lora.library remove LIB TASK
    python -m fasttd3_lora.library export LIB --out DIR [--task T]

Adapters are trained by the training app: `python -m fasttd3_lora.train algo=ppo library=LIB library.rank=4
task=dmc/walker-run` (or `library.tasks=[...]` for several tasks in one run) adds them when the run finishes.

`export` writes `library.onnx`, one model for the whole library with inputs ``obs`` (float32, [batch, obs_dim]) and
``task_id`` (int64, [batch]: the row's task, in deploy.yaml's `tasks` order) and output ``actions``: each row runs
the base with its task's adapter, one mixed-batch forward. `--task T` writes `policy.onnx` instead, the base with
T's adapter merged into plain weights (input ``obs`` only, as `fasttd3_lora.export` writes for a run). Both are
checked in onnxruntime against PyTorch before they are kept, and come with deploy.yaml. Errors: one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
import yaml

import fasttd3_lora
from fasttd3_lora.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint
from fasttd3_lora.export import (
    DEPLOY_FILE,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    POLICY_FILE,
    DeployPolicy,
    ExportError,
    IndexedPolicy,
    export_onnx,
    quiet_exporter,
    sample_observations,
    verify_onnx,
    write_metadata,
)
from fasttd3_lora.library_store import Library, LibraryError, create_library, library_policy

__all__ = ["LIBRARY_MODEL", "TASK_INPUT", "size_rows", "export_library", "main"]

LIBRARY_MODEL = "library.onnx"
TASK_INPUT = "task_id"
EXIT_ERROR = 2


def size_rows(library: Library) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per task: rank, trainable numbers, adapter bytes (tensors and on disk) and the same for a full copy of the
    policy, with ratios and the eval return; and the whole library against one full copy per task."""
    base = library.base
    full_numel, full_bytes, full_disk = base["policy_numel"], base["policy_tensor_bytes"], base["bytes_on_disk"]
    rows = []
    for task, entry in sorted(library.entries.items()):
        rows.append({
            "task": task, "rank": entry["rank"], "trainable": entry["trainable"], "full_trainable": full_numel,
            "tensor_bytes": entry["tensor_bytes"], "bytes_on_disk": entry["bytes_on_disk"],
            "full_tensor_bytes": full_bytes, "full_bytes_on_disk": full_disk,
            "x_smaller_on_disk": full_disk / entry["bytes_on_disk"], "x_fewer_numbers": full_numel / entry["trainable"],
            "eval_return": entry.get("eval_return"), "env_step": entry.get("env_step"),
        })  # fmt: skip
    n = len(rows)
    total_disk = full_disk + sum(r["bytes_on_disk"] for r in rows)
    summary = {"tasks": n, "library_bytes_on_disk": total_disk, "full_copies_bytes_on_disk": n * full_disk,
               "library_vs_full_copies": total_disk / (n * full_disk) if n else None,
               "value_bytes_on_disk": base["value_bytes_on_disk"]}  # fmt: skip
    return rows, summary


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _list(library: Library) -> None:
    base = library.base
    print(f"library {library.path}: base from {base['task']} ({base['source']}, env_step {_fmt(base['env_step'])}, "
          f"eval return {_fmt(base['eval_return'])}); policy {base['obs_dim']} -> {base['actor_hidden_dims']} -> "
          f"{base['act_dim']}, {base['policy_numel']:,} numbers, {base['bytes_on_disk']:,} B on disk")  # fmt: skip
    rows, summary = size_rows(library)
    header = ("task", "rank", "trainable", "full copy", "adapter B", "full copy B", "x smaller", "eval return",
              "env steps")  # fmt: skip
    table = [header] + [
        (r["task"], _fmt(r["rank"]), _fmt(r["trainable"]), _fmt(r["full_trainable"]), _fmt(r["bytes_on_disk"]),
         _fmt(r["full_bytes_on_disk"]), f"{r['x_smaller_on_disk']:.1f}x", _fmt(r["eval_return"]), _fmt(r["env_step"]))
        for r in rows
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    if rows:
        print(f"{summary['tasks']} task(s): library {summary['library_bytes_on_disk']:,} B on disk (base + adapters) vs "
              f"{summary['full_copies_bytes_on_disk']:,} B for one full copy per task "
              f"({100 * summary['library_vs_full_copies']:.1f}%); the base's value function "
              f"({summary['value_bytes_on_disk']:,} B) is kept for training only")  # fmt: skip


def _deploy_facts(library: Library, tasks: Sequence[str], model: dict[str, Any], verification: dict[str, Any]) -> dict[str, Any]:
    base = library.base
    env = base.get("env") or {}
    return {
        "format": "fasttd3-lora-library-deploy/1",
        "package_version": fasttd3_lora.__version__,
        "tasks": list(tasks),
        "base": {"task": base["task"], "source": base["source"]},
        "adapters": {t: {k: library.entries[t].get(k) for k in ("rank", "alpha", "eval_return", "env_step")}
                     for t in tasks},  # fmt: skip
        "model": model,
        "observation": {**env.get("observation", {"dim": base["obs_dim"]}),
                        "normalization": "folded into the model (the base's statistics); feed raw observations"},
        "action": env.get("action", {"dim": base["act_dim"]}),
        "control_period_s": env.get("control_period_s"),
        "verification": verification,
    }  # fmt: skip


def export_library(library: Library, out: str | Path, task: str | None = None, num_obs: int = 1000,
                   tolerance: float = 1e-4, seed: int = 0) -> tuple[Path, Path, float]:  # fmt: skip
    """Write library.onnx (every task, input task_id) or, with `task`, policy.onnx (that task's adapter merged),
    each with deploy.yaml; checked in onnxruntime against PyTorch first. Returns (model, deploy.yaml, max diff)."""
    import onnxruntime as ort

    tasks = sorted(library.entries) if task is None else [task]
    if task is not None and task not in library.entries:
        raise LibraryError(f"--task {task}: the library has no adapter for it (it has: "
                           f"{', '.join(sorted(library.entries)) or 'none'})")  # fmt: skip
    policy, rms = library_policy(library, tasks)
    out = Path(out)
    obs = sample_observations(rms, library.base["obs_dim"], num_obs, torch.Generator().manual_seed(seed))
    verification = {"runtime": f"onnxruntime {ort.__version__}", "num_obs": num_obs, "seed": seed,
                    "obs_source": "N(mean, var) of the base's observation statistics", "tolerance": tolerance}  # fmt: skip
    if task is not None:  # one task's merged policy: a plain model
        module = DeployPolicy(policy.merged(0), rms, library.base["obs_dim"])
        name = POLICY_FILE
        model = {"file": name, "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME, "dtype": "float32",
                 "input_shape": ["batch", module.obs_dim], "output_shape": ["batch", module.act_dim]}  # fmt: skip
    else:  # every task: a task_id input picks each row's adapter
        module = IndexedPolicy(policy, rms, library.base["obs_dim"], TASK_INPUT, tasks)
        name = LIBRARY_MODEL
        model = {"file": name, "opset": OPSET, "inputs": {INPUT_NAME: ["batch", library.base["obs_dim"]],
                 TASK_INPUT: ["batch"]}, "task_id": "int64 index into tasks", "output": OUTPUT_NAME,
                 "output_shape": ["batch", library.base["act_dim"]], "dtype": "float32"}  # fmt: skip
    candidate = out / f".{name}.tmp"
    try:
        with quiet_exporter():
            export_onnx(module, candidate)
        diff = verify_onnx(candidate, module, obs, tolerance)
        metadata = _deploy_facts(library, tasks, model, {**verification, "max_abs_diff": diff})
        write_metadata(candidate, metadata)
        os.replace(candidate, out / name)
    finally:
        candidate.unlink(missing_ok=True)
    deploy_path = out / DEPLOY_FILE
    deploy_path.write_text(yaml.safe_dump(metadata, sort_keys=False, default_flow_style=None, width=120))
    return out / name, deploy_path, diff


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints usage and exits 2; we print one line
        _fail(f"{message} (python -m fasttd3_lora.library --help)")


def _fail(message: str) -> NoReturn:
    print(f"fasttd3-library: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _Parser(prog="python -m fasttd3_lora.library", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    create = commands.add_parser("create", help="a new library whose base is a PPO run's policy")
    create.add_argument("library")
    create.add_argument("--base", required=True, help="a PPO run directory or checkpoint")
    commands.add_parser("list", help="tasks, ranks, sizes, returns").add_argument("library")
    remove = commands.add_parser("remove", help="drop a task's adapter")
    remove.add_argument("library")
    remove.add_argument("task")
    export = commands.add_parser("export", help="ONNX of the whole library (or of one task, merged)")
    export.add_argument("library")
    export.add_argument("--out", required=True)
    export.add_argument("--task", default=None)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "create":
            source = resolve_checkpoint(args.base)
            library = create_library(args.library, load_checkpoint(source), args.base)
            print(f"created {library.path}: base {library.base['task']} from {args.base} "
                  f"({library.base['policy_numel']:,} policy numbers)")  # fmt: skip
        elif args.command == "list":
            _list(Library(args.library))
        elif args.command == "remove":
            Library(args.library).remove(args.task)
            print(f"removed {args.task} from {args.library}")
        else:
            path, deploy, diff = export_library(Library(args.library), args.out, args.task)
            print(f"wrote {path} and {deploy}; onnxruntime vs PyTorch: max abs difference {diff:.3g}")
    except (LibraryError, CheckpointError, ExportError) as err:
        _fail(str(err))


if __name__ == "__main__":
    main()
