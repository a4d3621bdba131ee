"""Packs the Python packages ``gpu_suite.py`` needs that a GPU machine's image lacks into one
archive, for a machine that cannot reach a package index (the lent GPU machines here: Python 3.12
with PyTorch, CUDA and a long list of scientific packages, no Ray, no diffusers, no decord).

    python benchmarks/gpu_payload.py                  # -> .gpu/site.tar.xz (about 50 MB)
    python benchmarks/gpu_payload.py --list           # what would go in, and why, nothing fetched

What goes in: the project's dependencies and theirs (markers read for CPython 3.12 on Linux
x86-64), at the versions installed in this environment (the ones the test suite passed with), less
everything the machine already has (``PRESENT``, read from the machine's package list) and what
must not travel (``LEFT_OUT``). A pure-Python package is copied from this environment; one with
compiled parts comes as its CPython 3.12 manylinux wheel from the package index. Ray's parts the
suite never imports (RLlib, Serve, its LLM library, Java jars, the web client's source maps) are
pruned so that the archive, with the repository, stays under the device's 64 MiB.

On the machine (the archive carried in ``.gpu``, which ``.gitignore`` keeps out of commits):

    mkdir -p /tmp/site /tmp/pkg && tar -xJf .gpu/site.tar.xz -C /tmp/site && ln -sfn "$PWD" /tmp/pkg/disco \\
      && export PYTHONPATH=/tmp/pkg:/tmp/site && python3 benchmarks/gpu_suite.py --train-matrix quick
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
# The machine image's packages (the device tool's KINDS.md, read 2026-11-17): not carried, and
# their own requirements are the image's business.
PRESENT = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp
""".split())
LEFT_OUT = {
    # The machine's own CUDA build of PyTorch stays the one used.
    "torch": "the machine's CUDA build is used", "torchvision": "the machine's CUDA build is used",
    # MediaPipe 0.10.14 needs protobuf < 5; the machine's protobuf 7 is what its TensorBoard and
    # Ray's dashboard run on, and an old protobuf in front of it breaks them. The suite reports
    # MediaPipe as not installed there (its figures come from the CPU machines).
    "mediapipe": "needs protobuf < 5 (the machine has 7)", "protobuf": "the machine's own is kept",
    "opencv-contrib-python": "MediaPipe's; not carried with it",
    # PyAV's wheel bundles FFmpeg (about 40 MB): only generate's video writer needs it.
    "av": "bundles FFmpeg (~40 MB); only generate's .mp4 writer uses it",
}
# Ray's parts that gpu_suite never imports, pruned from the archive (glob patterns). The
# dashboard's web client stays (the dashboard, which ``ray job submit`` talks to, refuses to start
# without it); its source maps go.
RAY_PRUNE = ["ray/jars", "ray/rllib", "ray/serve", "ray/llm", "ray/tests", "ray/cpp", "ray/*/examples",
             "ray/dashboard/client/build/**/*.map"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, tuple[str, str]]:
    """{package: (version installed here, the package that asked for it)} for what must travel."""
    wanted: dict[str, tuple[str, str]] = {}
    # Markers are read where a requirement is queued: a child's ``extra == "default"`` speaks of
    # its parent's extras.
    queue = [(req, "disco") for req in map(Requirement, roots) if req.marker is None or req.marker.evaluate(TARGET)]
    while queue:
        req, parent = queue.pop()
        name = canonical(req.name)
        if name in PRESENT or name in LEFT_OUT or name.startswith("nvidia-") or name in wanted:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} (wanted by {parent}) is not installed here: run `make test` first") from None
        wanted[name] = (dist.version, parent)
        for line in dist.requires or []:
            child = Requirement(line)
            if child.marker is not None and not any(child.marker.evaluate({**TARGET, "extra": e})
                                                    for e in ["", *req.extras]):
                continue
            queue.append((child, name))
    return wanted


def compiled(name: str) -> bool:
    return any(str(f).endswith((".so", ".pyd")) or ".so." in str(f) for f in metadata.distribution(name).files or [])


def copy_installed(name: str, site: Path) -> None:
    dist = metadata.distribution(name)
    for file in dist.files or []:
        if "__pycache__" in file.parts or str(file).startswith(".."):
            continue  # byte code is per interpreter; scripts outside site-packages are not needed
        source = Path(dist.locate_file(file))
        if source.is_file():
            (site / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, site / file)


def fetch_wheels(pins: list[str], folder: Path, site: Path) -> None:
    """The CPython 3.12 manylinux wheels of ``pins``, unpacked into ``site``."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    common = ["--only-binary=:all:", "--no-deps", "--python-version", "3.12", "--implementation", "cp", *platforms]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(folder), *common, *pins], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-compile", "--target", str(site), *common,
                    *map(str, sorted(folder.glob("*.whl")))], check=True)


def prune(site: Path) -> None:
    for pattern in RAY_PRUNE:
        for path in list(site.glob(pattern)):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts, written for this interpreter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".gpu" / "site.tar.xz")
    parser.add_argument("--list", action="store_true", help="print what would be packed, fetch nothing")
    parser.add_argument("--max-mib", type=float, default=60.0, help="refuse an archive larger than this")
    args = parser.parse_args()

    roots = [r for r in metadata.distribution("disco").requires or [] if "extra ==" not in r]
    wanted = closure(roots)
    binary = sorted(n for n in wanted if compiled(n))
    if args.list:
        for name, (version, parent) in sorted(wanted.items()):
            how = "cp312 wheel" if name in binary else "copied"
            print(f"{name}=={version:12s} {how:12s} (for {parent})")
        for name, why in LEFT_OUT.items():
            print(f"left out: {name}: {why}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        site.mkdir()
        for name in sorted(set(wanted) - set(binary)):
            copy_installed(name, site)
        fetch_wheels([f"{n}=={wanted[n][0]}" for n in binary], Path(tmp) / "wheels", site)
        prune(site)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.out, "w:xz", preset=6) as tar:
            for entry in sorted(site.iterdir()):
                tar.add(entry, arcname=entry.name)
    mib = args.out.stat().st_size / 2**20
    print(f"{args.out}: {len(wanted)} packages ({len(binary)} as cp312 wheels), {mib:.1f} MiB")
    if mib > args.max_mib:
        raise SystemExit(f"{args.out} is {mib:.1f} MiB, over --max-mib {args.max_mib:g}: the device takes 64 MiB "
                         "with the repository; prune more (RAY_PRUNE) or leave a package out")


if __name__ == "__main__":
    main()
