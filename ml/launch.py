"""Launch a training run on K processes per node with torchrun (``torch.distributed.run``).

    launch_training(request_json, nproc_per_node=8, rdzv={"nnodes": 2, "node_rank": 0,
                    "rdzv_backend": "c10d", "rdzv_endpoint": "host0:29400", "rdzv_id": "omnisage"})

Every rank runs ``python -m ml.training_run REQUEST`` (DDP: NCCL on CUDA, gloo on CPU; rank 0 logs to
MLflow and registers). Every line the ranks print is passed to ``log`` as it arrives (the Dagster run's log,
or the terminal). The launcher stays in the caller's process group and session (never
``start_new_session``), so a kill of the Dagster step's process group reaches torchrun and every rank; and
torchrun gets SIGTERM if the calling process dies first (``PR_SET_PDEATHSIG``), which stops its ranks.
A single node without rendezvous options runs ``--standalone`` (a free local port).
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

#: torchrun options that pass through (``--nnodes 2 --node-rank 0 --rdzv-endpoint host:port`` ...)
RDZV_OPTIONS = (
    "nnodes",
    "node_rank",
    "rdzv_backend",
    "rdzv_endpoint",
    "rdzv_id",
    "master_addr",
    "master_port",
    "max_restarts",
)


def torchrun_command(request: Path, nproc_per_node: int, rdzv: Mapping[str, object] | None = None) -> list[str]:
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    rdzv = {k: v for k, v in (rdzv or {}).items() if v is not None}
    unknown = sorted(set(rdzv) - set(RDZV_OPTIONS))
    if unknown:
        raise ValueError(f"unknown torchrun option(s) {unknown}; known: {list(RDZV_OPTIONS)}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={int(nproc_per_node)}"]
    if not rdzv:
        cmd.append("--standalone")
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in rdzv.items()]
    return [*cmd, "-m", "ml.training_run", str(request)]


try:  # loaded here, not in the child: between fork and exec the child only makes one C call
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _LIBC = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG = 1


def launch_training(
    request: Path,
    nproc_per_node: int,
    *,
    rdzv: Mapping[str, object] | None = None,
    log: Callable[[str], None] = print,
    env: Mapping[str, str] | None = None,
) -> None:
    """Runs torchrun to completion, streaming its output to ``log``; raises with the exit code and the last
    lines on failure. An exception in the caller (e.g. the step is interrupted) terminates torchrun."""
    cmd = torchrun_command(request, nproc_per_node, rdzv)
    log("launching: " + " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 (one prctl call through a preloaded libc)
        env=None if env is None else dict(env),
    )
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = (tail + [line])[-20:]
            log(line)
        rc = proc.wait()
    except BaseException:
        proc.terminate()  # torchrun forwards the signal to its ranks and waits for them
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    if rc != 0:
        raise RuntimeError(
            f"torchrun exited with status {rc} ({nproc_per_node} process(es) per node); last lines:\n" + "\n".join(tail)
        )
