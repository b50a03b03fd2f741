"""Builds hybrid_ep and its CUDA extension `hybrid_ep._C` ahead of time (no compiler is needed at run time).

Environment (read here, and only here, at build time):
    CUDA_HOME / CUDA_PATH       CUDA toolkit root; else found from `nvcc` on PATH, /usr/local/cuda, /usr/local/cuda-*.
    TORCH_CUDA_ARCH_LIST        GPU architectures to compile for (default "9.0a").
    HYBRID_EP_MULTINODE=1       compile with HEP_ENABLE_MULTINODE (the internode kernels are not written yet).
    HYBRID_EP_NO_EXTENSION=1    when no CUDA toolkit is found, install the pure-Python package without `_C`.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION_FILE = os.path.join(ROOT, "hybrid_ep", "version.py")
DEFAULT_ARCH_LIST = "9.0a"


def env_flag(name: str, default: bool = False) -> bool:
    """Returns: the boolean value of env `name` ("1"/"true"/"yes"/"on" or "0"/"false"/"no"/"off"/""), else `default`."""
    value = os.environ.get(name)
    if value is None:
        return default
    value = value.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of 1/0, true/false, yes/no, on/off")


def read_version() -> str:
    # NOTES: parsed as text so that building never imports the package (its __init__ imports torch and `_C`).
    with open(VERSION_FILE) as f:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f'{VERSION_FILE} must contain a line `__version__ = "X.Y.Z"`')
    return match.group(1)


def find_cuda_home():
    """Returns: the CUDA toolkit root (a folder holding bin/nvcc), or None when none is found."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")

    def version_key(path):
        return tuple(int(x) for x in re.findall(r"\d+", os.path.basename(path)))

    candidates += sorted(glob.glob("/usr/local/cuda-*"), key=version_key, reverse=True)
    for path in candidates:
        # NOTES: a toolkit has both the compiler and the headers; `nvcc` on PATH may be a wrapper script in a
        # folder such as /usr/local/bin, whose parent holds no CUDA headers.
        if path and all(os.path.exists(os.path.join(path, f)) for f in ("bin/nvcc", "include/cuda_runtime_api.h")):
            return path
        if path and path in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
            print(f"hybrid_ep: {path} (from CUDA_HOME/CUDA_PATH) holds no bin/nvcc or include/cuda_runtime_api.h")
    return None


def nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        return f"unknown ({exc})"
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return match.group(2) if match else out.strip().splitlines()[-1]


# Sources grouped by feature; each group is compiled only when its feature is on.
SOURCES = {
    "core": [
        "csrc/python_api.cpp",
        "csrc/runtime/build_info.cpp",
        "csrc/runtime/layout.cpp",
        "csrc/kernels/layout.cu",
        "csrc/runtime/permute.cpp",
        "csrc/kernels/permute.cu",
    ],
    # The NVLink runtime of Buffer and its kernels (dispatch and combine to come).
    "intranode": [
        "csrc/runtime/buffer.cpp",
        "csrc/kernels/intranode/barrier.cu",
        "csrc/kernels/intranode/notify.cu",
        "csrc/kernels/intranode/dispatch.cu",
        "csrc/kernels/intranode/combine.cu",
        "csrc/kernels/intranode/combine_pull.cu",
    ],
    # NVML topology probe (libnvidia-ml through dlopen: no NVML header or library needed to build).
    "topology": [
        "csrc/runtime/topology/nvml_wrap.cpp",
        "csrc/runtime/topology/topology.cpp",
    ],
    # "internode": csrc/kernels/internode/*.cu, built only with HYBRID_EP_MULTINODE=1, when written.
    "internode": [],
}

version = read_version()
multinode = env_flag("HYBRID_EP_MULTINODE", False)
no_extension = env_flag("HYBRID_EP_NO_EXTENSION", False)
cuda_home = find_cuda_home()

ext_modules = []
cmdclass = {}
if cuda_home is None:
    if not no_extension:
        sys.exit(
            "hybrid_ep: no CUDA toolkit found (looked at CUDA_HOME, CUDA_PATH, nvcc on PATH, /usr/local/cuda, "
            "/usr/local/cuda-*). Set CUDA_HOME to the toolkit root to build the extension hybrid_ep._C, or set "
            "HYBRID_EP_NO_EXTENSION=1 to install the pure-Python package without it."
        )
    print("hybrid_ep: no CUDA toolkit found and HYBRID_EP_NO_EXTENSION=1: installing without hybrid_ep._C")
else:
    # NOTES: torch.utils.cpp_extension reads CUDA_HOME when it is imported, so it is set before the import.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]

    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    features = {"core": True, "intranode": True, "topology": True, "internode": False}
    sources = SOURCES["core"] + SOURCES["intranode"] + SOURCES["topology"]
    macros = [f'-DHEP_VERSION="{version}"', f'-DHEP_ARCH_LIST="{arch_list}"']
    if multinode:
        macros.append("-DHEP_ENABLE_MULTINODE")
        sources += SOURCES["internode"]
    cxx_flags = ["-O3", "-std=c++17"] + macros
    nvcc_flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + macros

    ext_modules.append(
        CUDAExtension(
            "hybrid_ep._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    )
    cmdclass["build_ext"] = BuildExtension

    print("hybrid_ep build summary")
    print(f"  version        {version}")
    print(f"  CUDA_HOME      {cuda_home}")
    print(f"  nvcc           {nvcc_version(cuda_home)}")
    print(f"  arch list      {arch_list}")
    print(f"  sources        {' '.join(sources)}")
    print(f"  cxx flags      {' '.join(cxx_flags)}")
    print(f"  nvcc flags     {' '.join(nvcc_flags)}")
    print(f"  features       {', '.join(k for k, v in features.items() if v)}")
    if multinode:
        print("  multinode      HYBRID_EP_MULTINODE=1: -DHEP_ENABLE_MULTINODE; internode kernels are not built yet")
    else:
        print("  multinode      off (set HYBRID_EP_MULTINODE=1; internode kernels are not built yet)")

setup(
    name="hybrid_ep",
    version=version,
    description="Expert-parallel dispatch/combine for MoE with a DeepEP v1 compatible API",
    packages=find_packages(include=["hybrid_ep", "hybrid_ep.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "nvidia-ml-py"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
