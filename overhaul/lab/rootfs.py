"""The lab's Debian root filesystem: built once with debootstrap, cached, shared read-only.

Every lab host is an overlay on top of this tree, so a host costs only what it writes.
The cache key is a hash of the recipe below: change a package and a new tree is built.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("openssh-server", "supervisor", "procps", "python3", "sudo", "init-system-helpers")
EXTRA_PACKAGES = ("mariadb-server", "mariadb-client")
REPO_MOUNT = "/srv/overhaul-repo"
RECIPE_VERSION = "3"

SSHD_CONFIG = """\
# Written by the Overhaul lab.
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
HostKey /etc/ssh/ssh_host_ed25519_key
"""

# Keep services from starting while packages are installed in the chroot.
POLICY_RC_D = "#!/bin/sh\nexit 101\n"


def cache_root() -> Path:
    """Where built root filesystems are kept (outside any checkout)."""
    base = os.environ.get("OVERHAUL_CACHE") or os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "overhaul"


def cache_key() -> str:
    recipe = "\n".join([RECIPE_VERSION, SUITE, *BASE_PACKAGES, *EXTRA_PACKAGES, SSHD_CONFIG, REPO_MOUNT])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def ensure_rootfs(log=print) -> Path:
    """Return the cached root filesystem, building it first if it is missing."""
    target = cache_root() / f"rootfs-{SUITE}-{cache_key()}"
    if (target / ".overhaul-complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # test workers and labs started at once build it once
        if not (target / ".overhaul-complete").exists():
            _build(target, log)
    return target


def _build(target: Path, log) -> None:
    building = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    log(f"lab: building the {SUITE} root filesystem in {target} (once; a few minutes)")
    try:
        _debootstrap(building)
        _install_extras(building)
        _configure(building)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    (building / ".overhaul-complete").write_text(cache_key() + "\n")
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"lab: {' '.join(argv[:3])} ... failed (exit {proc.returncode}):\n{tail}")


def _debootstrap(root: Path) -> None:
    _run([
        "debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
        SUITE, str(root), MIRROR,
    ])


def _install_extras(root: Path) -> None:
    shutil.copy("/etc/resolv.conf", root / "etc/resolv.conf")
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text(POLICY_RC_D)
    policy.chmod(0o755)
    # A private mount namespace: /proc and /dev vanish with it, nothing to clean up.
    script = (
        f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
        f"chroot {root} env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "
        f"--no-install-recommends {' '.join(EXTRA_PACKAGES)} && chroot {root} apt-get clean"
    )
    _run(["unshare", "--mount", "--fork", "sh", "-c", script])
    policy.unlink()


def _configure(root: Path) -> None:
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # every host generates its own at first boot
    (root / "etc/ssh/sshd_config.d/overhaul-lab.conf").write_text(SSHD_CONFIG)
    sources = root / "etc/apt/sources.list"
    if sources.exists():
        sources.unlink()
    (root / "etc/apt/sources.list.d/overhaul-lab.list").write_text(
        f"deb [trusted=yes] file:{REPO_MOUNT} ./\n"
    )
    (root / REPO_MOUNT.lstrip("/")).mkdir(parents=True, exist_ok=True)
    (root / "etc/resolv.conf").write_text("")
    _run(["chroot", str(root), "useradd", "--create-home", "--shell", "/bin/bash", "deploy"])
    (root / "etc/sudoers.d/deploy").write_text("deploy ALL=(ALL:ALL) NOPASSWD: ALL\n")
    (root / "etc/sudoers.d/deploy").chmod(0o440)
