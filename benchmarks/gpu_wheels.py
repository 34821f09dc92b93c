"""Wheels for `make gpu-check` on a bare GPU machine: `make gpu-wheels` (here, online).

Such a machine is offline and has its own CUDA build of torch, with Lightning, torchmetrics,
scikit-learn, matplotlib and their usual company, but not Hydra or MLflow. This saves into
`.whl/` what the pipeline needs beyond that, at uv.lock's versions, for that machine's Python:
Hydra and OmegaConf, and MLflow's client with its sqlite store (mlflow-skinny, SQLAlchemy,
Alembic), with everything they need that the machine lacks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
from pathlib import Path

NEEDED = ("hydra-core", "mlflow-skinny", "sqlalchemy", "alembic")
# what the GPU machine's Python already has, of what NEEDED depends on (its image's packages)
ON_THE_MACHINE = frozenset(
    [
        "annotated-doc",
        "anyio",
        "certifi",
        "charset-normalizer",
        "click",
        "cloudpickle",
        "h11",
        "idna",
        "markupsafe",
        "packaging",
        "protobuf",
        "pyyaml",
        "requests",
        "typing-extensions",
        "urllib3",
        "zipp",
    ]
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def closure(lock: dict, roots: tuple[str, ...]) -> dict[str, str]:
    """Name -> locked version of `roots` and what they need, less what the machine has."""
    packages = {package["name"]: package for package in lock["package"]}
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in found or name in ON_THE_MACHINE:
            continue
        found[name] = packages[name]["version"]
        todo += [
            dependency["name"]
            for dependency in packages[name].get("dependencies", [])
            if "sys_platform == 'win32'" not in dependency.get("marker", "")
        ]
    return dict(sorted(found.items()))


def download(pins: dict[str, str], directory: Path, python: str) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    for name, version in pins.items():
        pin = f"{name}=={version}"
        binary = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d"]
        command = [*binary, str(directory), "--only-binary=:all:", "--python-version", python]
        command += ["--implementation", "cp", *platforms, pin]
        if subprocess.run(command, capture_output=True).returncode != 0:
            # published as source only (antlr4-python3-runtime): build its pure-Python wheel
            build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w"]
            subprocess.run([*build, str(directory), pin], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    args = parser.parse_args()
    pins = closure(tomllib.loads(Path("uv.lock").read_text()), NEEDED)
    args.dest.mkdir(exist_ok=True)
    download(pins, args.dest, args.python)
    wheels = sorted(args.dest.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB in {args.dest}/: {', '.join(pins)}")


if __name__ == "__main__":
    main()
