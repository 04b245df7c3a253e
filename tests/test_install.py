"""The committed GPU lock against pyproject.toml, offline. CI also re-resolves the lock from PyPI's metadata and diffs
it (`make lock-gpu-check`); this catches a pyproject.toml edit without `make lock-gpu` where no network is."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$", re.M)


def _lock(path: Path) -> dict[str, Version]:
    return {canonicalize_name(name): Version(v) for name, v in PIN.findall(path.read_text())}


def test_gpu_lock_pins_every_declared_dependency_within_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"],
                                         *project["optional-dependencies"]["gpu"]]]
    lock = _lock(ROOT / "requirements-gpu.txt")
    assert len(lock) > 100  # the whole closure, not just the direct dependencies
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in lock, f"requirements-gpu.txt lacks {req.name}: run `make lock-gpu`"
        assert req.specifier.contains(lock[name], prereleases=True), (
            f"requirements-gpu.txt pins {req.name}=={lock[name]}, pyproject.toml wants {req}: run `make lock-gpu`")
    # The GPU environment takes vLLM's CUDA torch from PyPI, not the CPU wheel the CPU environment pins.
    cpu_torch = _lock(ROOT / "constraints.txt")["torch"]
    assert lock["torch"] > cpu_torch and not lock["torch"].local


def test_cpu_torch_pin_fits_the_declared_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [torch] = [Requirement(r) for r in project["dependencies"] if canonicalize_name(Requirement(r).name) == "torch"]
    assert torch.specifier.contains(_lock(ROOT / "constraints.txt")["torch"])
