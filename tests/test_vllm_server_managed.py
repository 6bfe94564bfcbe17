"""The managed vLLM server (`vlm_rl.rl.vllm_server`) without vLLM: `VLLMServer` launches a
**stand-in** "python", a small script that ignores `-m vllm.entrypoints.openai.api_server`, reads
`--port` and serves /v1/models over HTTP with the stdlib (or exits with an error, or never answers,
as $STAND_IN_MODE says), after starting a "worker" child as vLLM does. The export is skipped: the
tests put an exported folder's mark in folder/model. The real server: tests/test_vllm_server.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import vlm_rl
from vlm_rl.errors import ConfigError, VlmRlError
from vlm_rl.rl.engines import VLLMEngine, VLLMServerError
from vlm_rl.rl.vllm_server import EXPORT_MARK, VLLMServer, find_vllm_python, vllm_lora_rank

STAND_IN = f"""#!{sys.executable}
# A stand-in for vLLM's python: `-m vllm.entrypoints.openai.api_server ... --port P` serves /v1/models.
import http.server, json, os, signal, subprocess, sys, time

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
with open(os.environ["STAND_IN_RECORD"], "w") as record:
    json.dump({{"argv": args, "env": {{k: v for k, v in os.environ.items() if "VLLM" in k or k.startswith("OMP")}}, "cpus": sorted(os.sched_getaffinity(0))}}, record)
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
with open(os.environ["STAND_IN_RECORD"] + ".worker", "w") as pid:
    pid.write(str(worker.pid))
mode = os.environ["STAND_IN_MODE"]
print("INFO starting the stand-in server", flush=True)
if mode == "exit":
    print("Traceback (most recent call last):", flush=True)
    print("ValueError: max_lora_rank (9) must be one of (1, 8, 16)", flush=True)
    sys.exit(1)
if mode == "hang":
    time.sleep(600)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({{"data": [{{"id": args[args.index("--model") + 1]}}]}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


time.sleep(0.3)  # a start-up to wait through
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as gone
    status = Path(f"/proc/{pid}/stat")
    return not (status.is_file() and status.read_text().split(") ")[1].startswith("Z"))


def ended(pid: int) -> bool:
    """The process is gone within a second (a SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + 1.0
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def options(argv: list[str]) -> dict[str, str | None]:
    """A command line's --options with their values (None for a bare flag)."""
    values = {}
    for position, arg in enumerate(argv):
        if arg.startswith("--"):
            following = argv[position + 1] if position + 1 < len(argv) else "--"
            values[arg] = None if following.startswith("--") else following
    return values


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """(the stand-in python, the folder to serve from with its model already exported, the record)."""
    python = tmp_path / "stand-in-python"
    python.write_text(STAND_IN)
    python.chmod(0o755)
    folder = tmp_path / "vllm"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / EXPORT_MARK).write_text("tiny-llava\n")
    record = tmp_path / "record.json"
    monkeypatch.setenv("STAND_IN_RECORD", str(record))
    monkeypatch.setenv("STAND_IN_MODE", "serve")
    return python, folder, record


def test_the_server_starts_with_vllms_settings_answers_and_stops_with_its_workers(stand_in, monkeypatch):
    python, folder, record = stand_in
    server = VLLMServer(
        "tiny-llava", folder, python=python, max_lora_rank=9, cpus="0", max_num_seqs=16, seed=3
    )
    with server:
        assert server.url.startswith("http://127.0.0.1:")
        assert VLLMEngine(server.url).served_model() == str(folder / "model")
        launched = json.loads(record.read_text())
        worker = int(Path(f"{record}.worker").read_text())
        assert alive(worker)
    argv = launched["argv"]
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert options(argv) == {
        "--model": str(folder / "model"),
        "--host": "127.0.0.1",
        "--port": server.url.rsplit(":", 1)[1],
        "--dtype": "float32",
        "--enable-lora": None,
        "--max-lora-rank": "16",  # the smallest rank vLLM accepts above 9
        "--max-num-seqs": "16",
        "--logprobs-mode": "processed_logprobs",
        "--gpu-memory-utilization": "0.3",  # on a GPU, the trainer keeps the rest
        "--seed": "3",  # the run's: requests carry no seed
    }
    assert launched["env"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert launched["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0" and launched["env"]["OMP_NUM_THREADS"] == "1"
    assert launched["cpus"] == [0]  # the whole server on its core, not only vLLM's bound workers
    assert "INFO starting the stand-in server" in (folder / "server.log").read_text()
    # stopped: the server and the worker it started (same process group) are gone, the port closed
    assert server.process is None and ended(worker)
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/v1/models", timeout=2)
    server.stop()  # idempotent


def test_an_unpinned_server_is_not_bound_and_stop_kills_one_that_ignores_sigterm(stand_in, monkeypatch):
    python, folder, record = stand_in
    monkeypatch.setenv("STAND_IN_MODE", "stubborn")
    server = VLLMServer("tiny-llava", folder, python=python, max_lora_rank=8)
    server.start()
    pid = server.process.pid
    assert json.loads(record.read_text())["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    started = time.monotonic()
    server.stop(timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert ended(pid)


def test_a_server_that_exits_while_starting_is_an_error_quoting_its_log(stand_in, monkeypatch):
    python, folder, record = stand_in
    monkeypatch.setenv("STAND_IN_MODE", "exit")
    server = VLLMServer("tiny-llava", folder, python=python, max_lora_rank=8)
    with pytest.raises(VLLMServerError) as caught:
        server.start()
    message = str(caught.value)
    assert isinstance(caught.value, VlmRlError) and "\n" not in message
    assert "exited with code 1" in message and str(folder / "server.log") in message
    assert message.endswith('"ValueError: max_lora_rank (9) must be one of (1, 8, 16)"')
    assert server.process is None
    assert ended(int(Path(f"{record}.worker").read_text()))  # its worker was ended too


def test_a_server_that_never_answers_times_out_and_is_stopped(stand_in, monkeypatch):
    python, folder, record = stand_in
    monkeypatch.setenv("STAND_IN_MODE", "hang")
    server = VLLMServer("tiny-llava", folder, python=python, max_lora_rank=8, startup_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(VLLMServerError, match=r"did not answer within 1 s .*starting the stand-in server"):
        server.start()
    assert time.monotonic() - started < 5
    assert server.process is None
    assert ended(int(Path(f"{record}.worker").read_text()))


def test_lora_ranks_are_rounded_up_to_one_vllm_accepts():
    assert [vllm_lora_rank(r) for r in (1, 2, 8, 16, 17, 300, 512)] == [1, 8, 8, 16, 32, 320, 512]
    with pytest.raises(ConfigError, match="--lora_r 513"):
        vllm_lora_rank(513)


def test_the_vllm_python_is_found_flag_then_environment_then_venvs(tmp_path, monkeypatch):
    def venv_python(root: Path) -> Path:
        python = root / ".venv-vllm" / "bin" / "python"
        python.parent.mkdir(parents=True)
        python.touch()
        return python

    flag, variable = tmp_path / "flag-python", tmp_path / "env-python"
    flag.touch()
    variable.touch()
    here = venv_python(tmp_path / "here")
    checkout = venv_python(tmp_path / "checkout")
    monkeypatch.setattr(vlm_rl, "__file__", str(tmp_path / "checkout" / "src" / "vlm_rl" / "__init__.py"))
    monkeypatch.chdir(tmp_path / "here")
    monkeypatch.setenv("VLM_RL_VLLM_PYTHON", str(variable))
    assert find_vllm_python(str(flag)) == flag
    assert find_vllm_python() == variable
    monkeypatch.delenv("VLM_RL_VLLM_PYTHON")
    assert find_vllm_python() == here.absolute()
    monkeypatch.chdir(tmp_path)
    assert find_vllm_python() == checkout

    checkout.unlink()
    with pytest.raises(ConfigError) as caught:
        find_vllm_python()
    assert "\n" not in str(caught.value)
    assert "make vllm-env" in str(caught.value) and "--vllm_python" in str(caught.value)
    with pytest.raises(ConfigError, match="--vllm_python .*missing: no such file"):
        find_vllm_python(str(tmp_path / "missing"))


def test_a_run_that_crashes_leaves_no_server_behind(stand_in, tmp_path):
    """`stop` runs at exit: a process that starts a server and dies of an exception ends it."""
    python, folder, record = stand_in
    crashing_run = (
        "import sys; from pathlib import Path; from vlm_rl.rl.vllm_server import VLLMServer\n"
        f"server = VLLMServer('tiny-llava', Path({str(folder)!r}), python=Path({str(python)!r}), max_lora_rank=8)\n"
        "server.start(); print(server.process.pid, flush=True)\n"
        "raise RuntimeError('the run crashed')\n"
    )
    run = subprocess.run([sys.executable, "-c", crashing_run], capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "the run crashed" in run.stderr
    assert ended(int(run.stdout.split()[0]))
    assert ended(int(Path(f"{record}.worker").read_text()))


def test_a_folder_exported_for_another_model_is_exported_again(stand_in, monkeypatch):
    python, folder, record = stand_in
    exported = []
    monkeypatch.setattr(
        "vlm_rl.rl.vllm_export.export_for_vllm", lambda name, output_dir: exported.append((name, output_dir))
    )
    server = VLLMServer("smol-llava", folder, python=python, max_lora_rank=8)
    assert server.export() == folder / "model" and exported == [("smol-llava", folder / "model")]
    assert (folder / "model" / EXPORT_MARK).read_text() == "smol-llava\n"
    server.export()  # the mark now names smol-llava: nothing to do
    assert len(exported) == 1
