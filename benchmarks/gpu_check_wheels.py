"""The wheels the GPU check carries to the lent GPU machine (no network there; its image has
its own torch, accelerate, transformers, psutil, einops, msgpack, ninja and py-cpuinfo for
Python 3.12, but not these), and their offline install there.

    python benchmarks/gpu_check_wheels.py prepare DIR     # here, with the package index reachable
    python benchmarks/gpu_check_wheels.py install DIR TARGET

prepare: cp312 manylinux x86_64 binaries (or pure-Python wheels) of BINARY at the versions of
constraints.txt, and a DeepSpeed wheel built here (DeepSpeed is published as an sdist only;
built without its C++/CUDA ops, which it JIT-compiles where it runs); fails if DIR is over
the device call's 64 MiB. install: every wheel of DIR that fits this interpreter, with pip,
--no-index --no-deps into TARGET (one pip for all; wheel by wheel when that fails, so that one
bad wheel only drops itself); never aborts, returns what was installed, skipped and failed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the trainer, the benchmarks and DeepSpeed 0.19.8 import that the GPU image lacks, with
# what DeepSpeed requires that the image holds too (a copy is small, and protects from a
# changed image); transformers (which DeepSpeed's tests want) is in the image: too big to carry
BINARY = ["simplejpeg", "webdataset", "braceexpand", "hjson", "pydantic", "pydantic_core",
          "annotated-types", "typing-inspection", "typing_extensions", "msgpack", "py-cpuinfo",
          "einops", "ninja", "psutil"]
BUILT = ["deepspeed"]
LIMIT_MIB = 64  # the device call's working tree and carried paths together
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]


def pins() -> dict[str, str]:
    """name (lower case, '-' for '_') -> version, from constraints.txt."""
    found = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            found[canonical(name)] = version.strip()
    return found


def canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def prepare(folder: Path) -> int:
    """Download and build the wheels into `folder`; 1 if it is over LIMIT_MIB."""
    folder.mkdir(parents=True, exist_ok=True)
    versions = pins()
    wanted = [f"{name}=={versions[canonical(name)]}" for name in BINARY]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
        "cp", *platforms, "-d", str(folder), *wanted)
    for name in BUILT:  # an sdist only: a py3-none-any wheel, built against this torch, no ops
        if not list(folder.glob(f"{name}-{versions[name]}-*.whl")):
            pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), f"{name}=={versions[name]}")
    wheels = sorted(folder.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{size:8.2f} MiB  in {len(wheels)} wheels in {folder} "
          f"(limit {LIMIT_MIB} MiB with the working tree)")
    if size > LIMIT_MIB:
        print(f"gpu_check_wheels: {folder} holds {size:.1f} MiB, over the {LIMIT_MIB} MiB "
              "a device call carries", file=sys.stderr)
        return 1
    return 0


def pip_install(wheels: list[Path], target: Path) -> str:
    """'' if pip installed `wheels` into `target`, else its last line."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                             "--no-index", "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                             "--target", str(target), *map(str, wheels)],
                            capture_output=True, text=True, env={**os.environ, "PIP_CONSTRAINT": ""})
    if result.returncode == 0:
        return ""
    return ([line for line in result.stderr.splitlines() if line.strip()] or ["?"])[-1].strip()[-200:]


def fits(wheels: list[Path]) -> tuple[list[Path], list[Path]]:
    """(wheels this interpreter can install, the others: e.g. cp312 ones on a CPU dry run's 3.11)."""
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    supported = set(sys_tags())
    ok = [w for w in wheels if parse_wheel_filename(w.name)[3] & supported]
    return ok, [w for w in wheels if w not in ok]


def install(folder: Path, target: Path) -> dict:
    """Install what fits from `folder` into `target`; never raises for a wheel that fails."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        return {"installed": [], "skipped": [], "failed": {str(folder): "no wheels there"}}
    usable, skipped = fits(wheels)
    marker, wanted = target / ".gpu_check_wheels.json", [[w.name, w.stat().st_size] for w in usable]
    if marker.exists() and json.loads(marker.read_text()) == wanted:  # left as it was: a rewrite
        failed = {}  # would make DeepSpeed's JIT op look changed and rebuild (minutes on a CPU)
    else:
        marker.unlink(missing_ok=True)
        failed = {}
        if usable and pip_install(usable, target):  # one bad wheel: find it, keep the others
            for wheel in usable:
                if error := pip_install([wheel], target):
                    failed[label(wheel)] = error
        if not failed:
            marker.write_text(json.dumps(wanted))
    return {"target": str(target), "installed": [label(w) for w in usable if label(w) not in failed],
            "skipped": [label(w) for w in skipped], "failed": failed}


def label(wheel: Path) -> str:
    return "-".join(wheel.name.split("-")[:2])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"] and len(argv) == 2:
        return prepare(Path(argv[1]))
    if argv[:1] == ["install"] and len(argv) == 3:
        result = install(Path(argv[1]), Path(argv[2]))
        print(json.dumps(result))
        return 1 if result["failed"] else 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
