"""Put the wheels that the GPU machine's image lacks into .whl/ (git-ignored), for the device tool to carry.

    python benchmarks/gpu/wheels.py            # downloads into .whl/ and says what will travel
    python benchmarks/gpu/wheels.py --check    # only says what is there and what would travel

The lent H200's image (the device tool's KINDS.md) runs Python 3.12 with JAX, flax, optax, chex, numpy,
tensorboard, tqdm, h5py, imageio, absl-py, etils and protobuf already installed, and nothing can be
downloaded there. What our scripts import beyond that travels as wheels, at the versions this
environment runs (requirements.txt's pins and what pip chose for their needs). The device tool carries at
most 64 MiB, the working tree included, so dm_control (54 MiB), and with it shimmy and ogbench, stay behind:
dm_control/... and OGBench ids are not run on the GPU.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEELS = os.path.join(ROOT, ".whl")
LIMIT_MIB = 64  # the device tool's limit on what travels
# What the scripts and the kit import that the image lacks, with what those import in turn.
PACKAGES = ["gymnasium", "farama-notifications", "mujoco", "glfw", "pyopengl", "websockets", "tyro", "docstring-parser",
            "typeguard", "tensorboardX"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux_2_5_x86_64", "manylinux1_x86_64"]


def pinned_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(f"error: {name} is not installed here; install requirements.txt first "
                         "(the wheels take the versions this environment runs)") from None


def working_tree_mib() -> float:
    """Size of what the device tool sends besides carried paths: tracked and untracked, not ignored, files."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    paths = [os.path.join(ROOT, p) for p in out.split("\0") if p]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 2**20


def wheels_mib(folder: str) -> float:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.whl"))) / 2**20


def download(name: str, version: str, folder: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", folder, f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or proc.stderr.splitlines()[-1:]
        raise SystemExit(f"error: pip could not download {name}=={version} for Python 3.12 x86_64: {' '.join(tail)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="download nothing; say what is there and what would travel")
    parser.add_argument("--dir", default=WHEELS, help="the wheels' folder (default .whl/, what device.sh installs)")
    args = parser.parse_args(argv)
    wanted = {name: pinned_version(name) for name in PACKAGES}
    if not args.check:
        os.makedirs(args.dir, exist_ok=True)
        for name, version in wanted.items():
            download(name, version, args.dir)
    have = sorted(os.path.basename(p) for p in glob.glob(os.path.join(args.dir, "*.whl")))
    norm = lambda s: s.lower().replace("-", "_").replace(".", "_")
    present = {(norm(w.split("-")[0]), w.split("-")[1]) for w in have}  # a wheel's name is {dist}-{version}-{tags}.whl
    missing = [f"{n}=={v}" for n, v in wanted.items() if (norm(n), v) not in present]
    tree, wheels = working_tree_mib(), wheels_mib(args.dir)
    shown = ".whl" if args.dir == WHEELS else args.dir
    print(f"{len(have)} wheels in {shown}/: {wheels:.1f} MiB; the working tree: {tree:.1f} MiB; together {tree + wheels:.1f} MiB "
          f"of the {LIMIT_MIB} MiB the device tool carries")
    if missing:
        print(f"missing: {', '.join(missing)}")
    if tree + wheels > LIMIT_MIB:
        print("too large to travel: remove files from the working tree or wheels from .whl/")
    return 1 if missing or tree + wheels > LIMIT_MIB else 0


if __name__ == "__main__":
    sys.exit(main())
