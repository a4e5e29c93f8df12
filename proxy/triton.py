"""Launch the real Triton Inference Server binary bundled in the `nvidia-pytriton` wheel.

No Docker: PyPI `nvidia-pytriton==0.7.0` ships Triton 2.51 (CPU, python backend) at
`site-packages/pytriton/tritonserver/bin/tritonserver` and its shared libraries in
`site-packages/nvidia_pytriton.libs/`. Running it on our own model repository needs:

- a backend directory whose `python/` holds `libtriton_python.so`,
  `triton_python_backend_utils.py` and the `triton_python_backend_stub` built for the
  running Python's major.minor (`prepare_backend_dir`);
- `LD_LIBRARY_PATH` with the wheel's libs and then the running Python's libdir, otherwise
  the stub binds to the distribution's libpython instead of the interpreter we run;
- the interpreter's bin dir first on `PATH`: the stub starts the `python3` it finds there,
  and that environment must have numpy < 2, tokenizers and onnxruntime;
- `FLOODWALL_CACHE` exported so `triton_models/embedder/1/model.py` finds the ONNX export.

`triton_command` returns argv + environment; starting, waiting and stopping are the
caller's job (`floodwall up`, the integration tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from proxy.models import cache_dir

PYTRITON_REQUIREMENT = "nvidia-pytriton==0.7.0"
_INSTALL_HINT = f"pip install {PYTRITON_REQUIREMENT}"

# Seconds Triton lets in-flight requests finish after SIGTERM (its default is 30): long
# enough for a batch on two cores, short enough that `floodwall up` stops promptly.
EXIT_TIMEOUT_S = 10


class TritonNotFoundError(RuntimeError):
    """The bundled Triton server (or a piece it needs) is missing; the message names the fix."""


def _pytriton_dir() -> Path:
    # find_spec, not import: importing pytriton pulls in its whole client stack.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(f"the Triton server is not installed: {_INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def _server_root() -> Path:
    return _pytriton_dir() / "tritonserver"


def _libs_dir() -> Path:
    # auditwheel puts the vendored libraries beside the package in site-packages.
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def find_tritonserver() -> Path:
    """Path of the bundled `tritonserver` binary; raises `TritonNotFoundError` if absent."""
    binary = _server_root() / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise TritonNotFoundError(f"tritonserver binary not found at {binary}: {_INSTALL_HINT}")
    return binary


def python_version_tag() -> str:
    """`major.minor` of the running interpreter, as pytriton names its stub directories."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _link(source: Path, dest: Path) -> None:
    """Make `dest` a symlink to `source`, replacing whatever was there unless already right."""
    if dest.is_symlink() and Path(os.readlink(dest)) == source:
        return
    if dest.is_symlink() or dest.exists():
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        else:
            dest.unlink()
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(source)
    os.replace(tmp, dest)  # atomic: a Triton starting concurrently never sees a gap


def prepare_backend_dir(cache: Path) -> Path:
    """Build `<cache>/triton/backends` with a `python/` backend for this interpreter.

    Returns the directory to pass as `--backend-directory`. Idempotent; the files are
    symlinks into the installed wheel, refreshed if they point elsewhere (another venv or
    Python version used the same cache before).
    """
    server_root = _server_root()
    wheel_backend = server_root / "backends" / "python"
    stub = (
        server_root / "python_backend_stubs" / python_version_tag() / "triton_python_backend_stub"
    )
    sources = {
        "libtriton_python.so": wheel_backend / "libtriton_python.so",
        "triton_python_backend_utils.py": wheel_backend / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, source in sources.items():
        if not source.is_file():
            raise TritonNotFoundError(
                f"{name} for Python {python_version_tag()} not found at {source}: "
                f"{_INSTALL_HINT} (supports Python 3.8-3.13)"
            )
    backends = cache / "triton" / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        _link(source.resolve(), python_dir / name)
    return backends


def model_names(model_repo: Path) -> list[str]:
    """The models (directories with a config.pbtxt) of a Triton repository."""
    return sorted(
        child.name
        for child in model_repo.iterdir()
        if child.is_dir() and (child / "config.pbtxt").is_file()
    )


def triton_command(
    model_repo: Path,
    *,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    host: str = "127.0.0.1",
    cache: Path | None = None,
    log_verbose: int = 0,
    shm_prefix: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """Argv and full environment to run Triton on `model_repo` with `subprocess.Popen`.

    All three endpoints bind to `host` (loopback by default: Envoy is the front door).
    `shm_prefix` names this server's python-backend shared-memory regions in /dev/shm, so
    `remove_shm_regions` can clean up after a server that was killed.
    """
    binary = find_tritonserver()
    cache = (cache if cache is not None else cache_dir()).expanduser().resolve()
    model_repo = model_repo.expanduser().resolve()
    if not model_repo.is_dir() or not model_names(model_repo):
        raise FileNotFoundError(f"no Triton models (*/config.pbtxt) under {model_repo}")
    backend_dir = prepare_backend_dir(cache)

    argv = [
        str(binary),
        f"--model-repository={model_repo}",
        f"--backend-directory={backend_dir}",
        f"--cache-directory={_server_root() / 'caches'}",
        # "none" loads every model in the repository at start-up and disables the
        # load/unload API: KServe v2 HTTP is passed through Envoy, and callers must not be
        # able to unload models through the gateway.
        "--model-control-mode=none",
        "--exit-on-error=true",
        # Ready only once every model is loaded (and warmed up): Envoy's health checks and
        # `floodwall up` wait on /v2/health/ready.
        "--strict-readiness=true",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-gpu-metrics=false",
        f"--log-verbose={log_verbose}",
    ]
    if shm_prefix:
        argv.append(f"--backend-config=python,shm-region-prefix-name={shm_prefix}")

    env = dict(os.environ)
    python_libdir = sysconfig.get_config_var("LIBDIR")
    lib_path = [str(_libs_dir())]
    if python_libdir:
        lib_path.append(str(python_libdir))
    if env.get("LD_LIBRARY_PATH"):
        lib_path.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_path)
    # Not resolved: a venv's bin/python3 is a symlink, and following it would leave the venv.
    python_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in (python_bin, env.get("PATH", "")) if p)
    env["FLOODWALL_CACHE"] = str(cache)
    return argv, env


def remove_shm_regions(prefix: str) -> int:
    """Deletes /dev/shm regions a stopped server left behind (a killed Triton cannot clean up;
    each region is 1 MiB+). Only for a server started with this `shm_prefix`."""
    removed = 0
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        with contextlib.suppress(OSError):
            region.unlink()
            removed += 1
    return removed
