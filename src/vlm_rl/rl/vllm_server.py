"""A vLLM server that a run starts from vLLM's own venv and stops at its end (`--rollout_engine vllm`).

    with VLLMServer("tiny-llava", Path("runs/x/vllm"), python=find_vllm_python(), max_lora_rank=8) as server:
        engine = VLLMEngine(server.url)

vLLM cannot share vlm_rl's venv (it pins older transformers and numpy), so the server runs from the
one `make vllm-env` builds (`find_vllm_python`). `start` exports the policy's base model as vLLM
loads it (`vlm_rl.rl.vllm_export`), launches vLLM's OpenAI-compatible server with the settings
docs/rollout_engine.md explains (fp32, runtime LoRA loading, processed log-probs) on a free port,
and waits until it lists its model. The server runs in its own process group (vLLM starts an
engine-core process and workers) so that `stop` ends all of it; `stop` also runs at exit, so a
crashing run leaves no server behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from vlm_rl.errors import ConfigError
from vlm_rl.rl.engines import VLLMServerError

logger = logging.getLogger(__name__)

__all__ = ["VLLMServer", "find_vllm_python", "vllm_lora_rank"]

VLLM_PYTHON_ENV = "VLM_RL_VLLM_PYTHON"
VENV_PYTHON = Path(".venv-vllm") / "bin" / "python"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The `--max-lora-rank` values vLLM 0.32 accepts (`vllm.config.lora.MaxLoRARanks`)."""
EXPORT_MARK = "vlm_rl_export.txt"
"""Written into the exported folder after a complete export: the model it holds."""


def find_vllm_python(explicit: str | None = None) -> Path:
    """The Python of the venv holding vLLM: `explicit` (--vllm_python), else $VLM_RL_VLLM_PYTHON,
    else .venv-vllm/bin/python in the current directory, else in the checkout vlm_rl is installed
    from (an editable install)."""
    given = explicit or os.environ.get(VLLM_PYTHON_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            source = "--vllm_python" if explicit else VLLM_PYTHON_ENV
            raise ConfigError(f"{source} {given}: no such file; give the python of a venv holding vLLM")
        return path
    import vlm_rl

    checkout = Path(vlm_rl.__file__).resolve().parents[2]
    for candidate in (Path.cwd() / VENV_PYTHON, checkout / VENV_PYTHON):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no vLLM venv found (.venv-vllm here or in {checkout}): run `make vllm-env` in a vlm_rl checkout, "
        f"or give its python with --vllm_python or {VLLM_PYTHON_ENV}"
    )


def vllm_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds an adapter of rank `rank`.

    >>> vllm_lora_rank(8), vllm_lora_rank(9)
    (8, 16)
    """
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"--lora_r {rank}: vLLM serves LoRA adapters up to rank {VLLM_LORA_RANKS[-1]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def last_meaningful_line(log: Path) -> str:
    """The log's last line that says something (not blank, not a bare traceback frame)."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()] if log.is_file() else []
    for line in reversed(lines):
        if line and not line.startswith(("File ", "^", "~", "Traceback")):
            return line[:300]
    return "(empty)"


class VLLMServer:
    """A vLLM server for `model_name_or_path`, its files under `folder` (model/, server.log)."""

    def __init__(
        self,
        model_name_or_path: str,
        folder: Path,
        *,
        python: Path,
        max_lora_rank: int,
        port: int | None = None,
        cpus: str | None = None,
        max_num_seqs: int = 64,
        startup_timeout: float = 600.0,
        logprobs_mode: str = "processed_logprobs",
        gpu_memory_utilization: float = 0.3,
        seed: int | None = None,
    ):
        """`cpus`: the cores vLLM's CPU workers are pinned to (VLLM_CPU_OMP_THREADS_BIND, e.g. "0" or
        "0-3", one thread each; None: not pinned, $OMP_NUM_THREADS threads or one). `logprobs_mode`: processed_logprobs, the sampling
        distribution's (what the importance weights need), or raw_logprobs (the model's softmax at
        temperature 1, which the trainer's numbers equal at --temperature 1). `gpu_memory_utilization`:
        the share of a GPU's memory vLLM takes (its default, 0.92, leaves none to the trainer; TRL's
        vllm_gpu_memory_utilization is 0.3 too; a CPU server ignores it). `seed`: the server's
        sampling seed (`--seed`; requests carry none, see `VLLMEngine.request`)."""
        self.model_name_or_path = model_name_or_path
        self.folder = Path(folder)
        self.python = Path(python)
        self.max_lora_rank = vllm_lora_rank(max_lora_rank)
        self.port = port
        self.cpus = cpus
        if cpus is not None:
            cpu_list(cpus)  # a bad list fails here, not in the server
        self.max_num_seqs = max_num_seqs
        self.startup_timeout = startup_timeout
        self.logprobs_mode = logprobs_mode
        self.gpu_memory_utilization = gpu_memory_utilization
        self.seed = seed
        self.url = ""
        self.process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    @property
    def model_dir(self) -> Path:
        return self.folder / "model"

    def export(self) -> Path:
        """The model as vLLM loads it, in folder/model (kept from an earlier export of the same model)."""
        mark = self.model_dir / EXPORT_MARK
        if mark.is_file() and mark.read_text().strip() == self.model_name_or_path:
            return self.model_dir
        from vlm_rl.rl.vllm_export import export_for_vllm

        export_for_vllm(self.model_name_or_path, self.model_dir)
        mark.write_text(self.model_name_or_path + "\n")
        return self.model_dir

    def command(self, port: int) -> list[str]:
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--enable-lora",
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--logprobs-mode",
            self.logprobs_mode,
            "--gpu-memory-utilization",
            str(self.gpu_memory_utilization),
            *(("--seed", str(self.seed)) if self.seed is not None else ()),
        ]

    def environment(self) -> dict[str, str]:
        threads = os.environ.get("OMP_NUM_THREADS", "1") if self.cpus is None else len(cpu_list(self.cpus))
        return {
            **os.environ,
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # the run hot-loads its adapter after each update
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; vLLM's default takes a large share of the memory
            "OMP_NUM_THREADS": str(threads),
            "VLLM_CPU_OMP_THREADS_BIND": self.cpus or "nobind",
        }

    def start(self) -> str:
        """Export the model, launch the server and wait until it answers; returns its url."""
        if self.process is not None:
            return self.url
        self.folder.mkdir(parents=True, exist_ok=True)
        self.export()
        port = self.port or free_port()
        self.url = f"http://127.0.0.1:{port}"
        cores = cpu_list(self.cpus) if self.cpus is not None else None
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                self.command(port),
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() ends vLLM's workers too
                # all of the server on its cores (its API process and engine core too, not only the
                # workers VLLM_CPU_OMP_THREADS_BIND binds), whatever the trainer's affinity
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
            )
        atexit.register(self.stop)
        logger.info(
            "starting a vLLM server for %s at %s (log: %s)", self.model_name_or_path, self.url, self.log
        )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise
        logger.info("vLLM server ready at %s", self.url)
        return self.url

    def _wait_until_ready(self) -> None:
        start = time.monotonic()
        while True:
            code = self.process.poll()
            if code is not None:
                raise VLLMServerError(
                    f"the vLLM server exited with code {code} while starting (log {self.log}): "
                    f'"{last_meaningful_line(self.log)}"'
                )
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=5) as response:
                    response.read()
                return
            except OSError:
                pass
            waited = time.monotonic() - start
            if waited > self.startup_timeout:
                raise VLLMServerError(
                    f"the vLLM server did not answer within {self.startup_timeout:.0f} s (log {self.log}): "
                    f'"{last_meaningful_line(self.log)}"'
                )
            time.sleep(min(1.0, 0.1 + waited / 10))

    def stop(self, timeout: float = 30.0) -> None:
        """End the server's process group: SIGTERM, then SIGKILL after `timeout` s. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        if process.poll() is None:
            signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                signal_group(process, signal.SIGKILL)
                process.wait()
        # workers of a server that exited by itself may outlive it
        signal_group(process, signal.SIGKILL)

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def signal_group(process: subprocess.Popen, number: int) -> None:
    try:
        os.killpg(process.pid, number)
    except ProcessLookupError:
        pass


def cpu_list(cpus: str) -> list[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND list.

    >>> cpu_list("0-2,5")
    [0, 1, 2, 5]
    """
    cores = []
    for part in cpus.split(","):
        first, _, last = part.partition("-")
        if not (first.isdigit() and (last or first).isdigit()):
            raise ConfigError(f"cpus {cpus!r}: give cores as a list such as 0 or 0-3 or 0,2")
        cores.extend(range(int(first), int(last or first) + 1))
    return cores
