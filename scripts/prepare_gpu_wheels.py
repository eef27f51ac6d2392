"""Fill .whl/ with the wheels that scripts/gpu_check.sh needs on a GPU machine that reaches no package index.

    python3 scripts/prepare_gpu_wheels.py [--dest .whl] [--python-version 3.12]

Run it here, on a machine with a package index; then carry .whl/ (git ignores it) to the GPU machine with
the working tree. gpu_check.sh installs from it offline, into a throw-away folder, only the wheels whose
package the machine lacks.

The GPU machine's image (Python 3.12) has torch, transformers (>= 5.17), accelerate (>= 1.15), peft,
safetensors, tokenizers, numpy, matplotlib, pyyaml, tqdm, rich, psutil, pyarrow, pandas, xxhash and
huggingface-hub (>= 1.31, which brings filelock, fsspec, packaging, httpx and click), and torch's jinja2.
It lacks what TRL needs beyond that: trl itself, datasets, and datasets' dill and multiprocess. The
versions below are the ones the test suite runs with; each wheel's Requires-Dist is checked against the
image's list and the other wheels here, so a new pin that drags in another package fails here, not there.

DeepSpeed publishes source archives only (its wheel is built on install), so it is not shipped: the
check's zero3 stage reports "skipped" on such a machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

REPO = Path(__file__).resolve().parent.parent

# name -> version. trl 1.16 asks for transformers >= 4.56.2, accelerate >= 1.10.1 and datasets >= 4.7;
# datasets 5.2 for huggingface-hub >= 1.31 and no requests (5.0 still needs requests, which the image lacks).
PINS = {"trl": "1.16.0", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
DEEPSPEED = "0.19.8"  # only probed: see the module docstring

# What the GPU machine's image provides (see the module docstring); a requirement outside this list and
# outside PINS is an error.
IMAGE = {canonicalize_name(name) for name in (
    "torch", "transformers", "accelerate", "peft", "safetensors", "tokenizers", "numpy", "matplotlib", "pyyaml",
    "tqdm", "rich", "psutil", "pyarrow", "pandas", "xxhash", "huggingface-hub", "filelock", "fsspec",
    "packaging", "httpx", "click", "jinja2", "typing-extensions")}

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
SIZE_LIMIT_MB = 32  # the working tree and carried folders travel in 64 MiB together


def download(spec: str, dest: Path, python_version: str, quiet: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", python_version, "--implementation", "cp",
               *[arg for platform in PLATFORMS for arg in ("--platform", platform)], "-d", str(dest), spec]
    if quiet:
        command.insert(4, "-q")
    return subprocess.run(command, capture_output=True, text=True)


def requirements_of(wheel: Path, python_version: str) -> list[Requirement]:
    """The wheel's unconditional requirements on Linux x86_64 under ``python_version``."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8"))
    environment = {**default_environment(), "python_version": python_version,
                   "python_full_version": f"{python_version}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython", "extra": ""}
    found = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            found.append(requirement)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=REPO / ".whl", help="where the wheels go (default: .whl/)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default: 3.12)")
    options = parser.parse_args()
    dest = options.dest
    dest.mkdir(parents=True, exist_ok=True)

    wanted = {canonicalize_name(name): version for name, version in PINS.items()}
    for wheel in dest.glob("*.whl"):  # one version of each package: drop what another pin left
        name, version, _, _ = parse_wheel_filename(wheel.name)
        if str(version) != wanted.get(name):
            wheel.unlink()
            print(f"removed {wheel.name} (not pinned)")
    for name, version in PINS.items():
        done = download(f"{name}=={version}", dest, options.python_version)
        if done.returncode != 0:
            print(f"prepare_gpu_wheels: no wheel of {name}=={version} for Python {options.python_version}: "
                  f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'pip download failed'}",
                  file=sys.stderr)
            return 1

    wheels = sorted(dest.glob("*.whl"))
    shipped = {parse_wheel_filename(w.name)[0]: (w, parse_wheel_filename(w.name)[1]) for w in wheels}
    problems = []
    for wheel in wheels:
        for requirement in requirements_of(wheel, options.python_version):
            name = canonicalize_name(requirement.name)
            if name in shipped:
                if not requirement.specifier.contains(shipped[name][1], prereleases=True):
                    problems.append(f"{wheel.name} needs {requirement}, but {shipped[name][0].name} is shipped")
            elif name not in IMAGE:
                problems.append(f"{wheel.name} needs {requirement}, which neither the image nor .whl/ has")

    with tempfile.TemporaryDirectory() as probe:  # only asks whether a wheel exists
        deepspeed = download(f"deepspeed=={DEEPSPEED}", Path(probe), options.python_version)
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB  in {len(wheels)} wheels, {dest}")
    print(f"deepspeed {DEEPSPEED}: " + ("a wheel exists, but it is not shipped (nor its dependencies)"
                                        if deepspeed.returncode == 0 else
                                        "no wheel on the index (source only): zero3 is skipped there"))
    if total > SIZE_LIMIT_MB * 2**20:
        problems.append(f"the wheels take {total / 2**20:.1f} MiB, more than {SIZE_LIMIT_MB} MiB")
    for problem in problems:
        print(f"prepare_gpu_wheels: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
