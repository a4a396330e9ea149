"""`package.upgrade`: a named package to a pinned version (or the newest), with apt or yum."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from overhaul.command import Command, sh
from overhaul.context import Probe, StepHost
from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step
from overhaul.transport import CommandResult

APT_ENV = sh("DEBIAN_FRONTEND=noninteractive")
APT_LOCK_WAIT = sh("-o DPkg::Lock::Timeout=120")  # wait for another apt or dpkg (up to 2 minutes) instead of failing
APT_UPDATE = sh("apt-get update -q {wait}", wait=APT_LOCK_WAIT)


MANAGER: Probe[str] = Probe("package manager", sh("command -v apt-get >/dev/null && echo apt || "
                            "{{ command -v yum >/dev/null && echo yum; }}"), lambda result: result.stdout.strip(),
                            stable=True)


def package_manager(host: StepHost) -> str:
    """apt or yum."""
    manager = host.read(MANAGER)
    if manager not in ("apt", "yum"):
        raise StepFailed("neither apt-get nor yum found on the host")
    return manager


def same_version(installed: str | None, target: str) -> bool:
    """apt versions compare whole; an rpm VERSION-RELEASE also matches a pin of its VERSION alone."""
    return installed is not None and (installed == target or ("-" not in target and installed.split("-")[0] == target))


def installed_command(package: str) -> Command:
    """Prints "Status|Version" of a package, apt or rpm alike."""
    return sh("if command -v dpkg-query >/dev/null; then dpkg-query -W -f '${{Status}}|${{Version}}' -- {name} "
              "2>/dev/null; else rpm -q --qf 'install ok installed|%{{VERSION}}-%{{RELEASE}}' -- {name} 2>/dev/null; fi",
              name=package)


# Finish what an interrupted dpkg left; while another dpkg holds its lock, wait (up to 2 minutes) and try again.
DPKG_CONFIGURE = sh("for i in $(seq 60); do out=$({env} dpkg --configure -a 2>&1) && break; "
                    "case $out in *lock*) sleep 2 ;; *) echo \"$out\" >&2; break ;; esac; done", env=APT_ENV)


def _installed(result: CommandResult) -> str | None:
    status, _, version = result.stdout.strip().partition("|")
    # "install ok installed", or "hold ok installed" for a package on hold (apt-mark hold): installed either way
    return version if result.ok and status in ("install ok installed", "hold ok installed") else None


def installed_probe(package: str) -> Probe[str | None]:
    return Probe(f"installed {package}", installed_command(package), _installed)


def installed_version(host: StepHost, package: str) -> str | None:
    """The version of `package` installed and fully configured, or None."""
    return host.read(installed_probe(package))


VERSIONLOCK_LISTS = ["/etc/yum/pluginconf.d/versionlock.list", "/etc/dnf/plugins/versionlock.list"]


def held_probe(package: str) -> Probe[str]:
    """How `package` is held where the package manager will not change it ("" when it is not): dpkg's "hold" (set by
    `apt-mark hold`), or the line of a yum/dnf versionlock list that locks it."""
    locked = "^!?([0-9]+:)?" + package.replace(".", "[.]").replace("+", "[+]") + "-[0-9]"  # [EPOCH:]NAME-VERSION
    command = sh("if command -v dpkg-query >/dev/null; then dpkg-query -W -f '${{Status}}' -- {name} 2>/dev/null "
                 "| grep -q '^hold ' && echo apt-mark; else grep -s -h -m 1 -E -- {locked} {lists}; fi; true",
                 name=package, locked=locked, lists=VERSIONLOCK_LISTS)
    return Probe(f"held {package}", command, lambda result: result.stdout.strip())


def _madison(result: CommandResult) -> list[str]:
    rows = [line.split("|") for line in result.stdout.splitlines()]
    return [row[1].strip() for row in rows if len(row) >= 3]


def available_probe(package: str) -> Probe[list[str]]:
    """apt's versions of `package` from its package lists as they are (newest first)."""
    return Probe(f"available {package}", sh("apt-cache madison -- {name}", name=package), _madison)


def older_probe(package: str, target: str) -> Probe[bool]:
    """apt: is `target` older than the installed version (installing it would downgrade)?"""
    command = sh("dpkg --compare-versions {target} lt \"$(dpkg-query -W -f '${{Version}}' -- {name} 2>/dev/null)\"",
                 target=target, name=package)
    return Probe(f"older {package} {target}", command, lambda result: result.ok)


def available_versions(host: StepHost, manager: str, package: str, refresh: bool = False) -> list[str]:
    """Every version of `package` the host's repositories offer, newest first (apt: after refreshing its lists
    if asked)."""
    if manager == "apt":
        if refresh:
            refreshed = host.run(APT_UPDATE)
            if not refreshed.ok:
                raise StepFailed(f"apt-get update failed: {refreshed.tail()}")
            versions = _madison(host.run(available_probe(package).command))
            host.facts.put(host.name, available_probe(package).key, versions)  # the lists as they are now
            return versions
        return host.read(available_probe(package))
    listing = host.run(sh("yum -q list available --showduplicates -- {name}", name=package)).stdout.splitlines()
    rows = [line.split() for line in listing]  # yum lists oldest first
    return [row[1] for row in reversed(rows) if len(row) >= 2 and row[0].startswith(package + ".")]


def newest_version(host: StepHost, manager: str, package: str) -> str:
    """The newest version of `package` the host's repositories offer, its package lists refreshed first."""
    available = available_versions(host, manager, package, refresh=True)
    if not available:
        raise StepFailed(f"no installable version of {package} found")
    return available[0]


VERSION = r"^[A-Za-z0-9][A-Za-z0-9.+~:_-]*$"  # what apt and rpm accept in a version (never a shell character)
PACKAGE = r"^[A-Za-z0-9][A-Za-z0-9.+_-]*$"


class UpgradeParams(Params):
    name: str = Field("scalr-server", pattern=PACKAGE)
    """The package to install (apt or yum, whichever the host has)."""
    version: str = Field("latest", pattern=VERSION)
    """A pinned version, or "latest": the newest the host's repositories offer."""
    allow_downgrade: bool = False
    """true: installing an older version than the installed one is allowed (otherwise refused)."""


class PackageUpgrade(Step[UpgradeParams]):
    """Install `name` at `version`; refuses a downgrade unless `allow_downgrade`.

    A host it changed journals `{"version": NEW, "previous": OLD}` (OLD absent when the package was not installed):
    the version a rollback goes back to.
    """

    name = "package.upgrade"
    reversible = True  # undo installs the version it found (a package it installed fresh is kept)

    def probes(self) -> list[Probe]:
        found: list[Probe] = [MANAGER, installed_probe(self.params.name), held_probe(self.params.name),
                              available_probe(self.params.name)]
        if self.params.version != "latest":
            found.append(older_probe(self.params.name, self.params.version))
        return found

    def _target(self, host: StepHost, manager: str) -> str:
        """The pinned version, or the newest the host's lists offer as they are (a check never refreshes them)."""
        if self.params.version != "latest":
            return self.params.version
        available = available_versions(host, manager, self.params.name)
        if not available:
            raise StepFailed(f"no installable version of {self.params.name} in this host's package lists")
        return available[0]

    def preflight(self, host: StepHost) -> Check:
        """The package is not on hold, the target version is in this host's repositories, and installing it is not a
        refused downgrade."""
        manager = package_manager(host)
        installed = installed_version(host, self.params.name)
        target = self.params.version
        if installed and same_version(installed, target):
            return Check(True, f"{self.params.name} {installed} already installed")
        held = host.read(held_probe(self.params.name))
        if held:
            return Check(False, _held_message(self.params.name, installed, held))
        # The lists as they are first (read-only, and no wait on the lists lock); refreshed only when they lack it.
        available = available_versions(host, manager, self.params.name)
        if target == "latest" or not any(same_version(version, target) for version in available):
            available = available_versions(host, manager, self.params.name, refresh=True)
        if target == "latest":
            target = available[0] if available else "latest"
        if not any(same_version(version, target) for version in available):
            offered = ", ".join(available) or "none"
            return Check(False, f"{self.params.name} {self.params.version} is not in this host's repositories "
                                f"(available: {offered})")
        if installed and not self.params.allow_downgrade and self._older(host, manager, target, installed):
            return Check(False, f"{self.params.name} {target} would downgrade {installed} (set allow_downgrade: true)")
        return Check(True, f"{self.params.name} {installed or '(not installed)'} -> {target}: available")

    def check(self, host: StepHost) -> Check:
        target = self._target(host, package_manager(host))
        installed = installed_version(host, self.params.name)
        if same_version(installed, target):
            return Check(True, f"{self.params.name} {installed} installed", {"version": installed})
        return Check(False, f"{self.params.name} {installed or '(not installed)'} -> {target}")

    def apply(self, host: StepHost) -> str:
        manager = package_manager(host)
        target = self._target(host, manager)
        installed = installed_version(host, self.params.name)
        self.remembered.setdefault("previous", installed)  # a retry after a half-done install keeps the first reading
        if installed and self._older(host, manager, target, installed) and not self.params.allow_downgrade:
            raise StepFailed(
                f"refusing to downgrade {self.params.name} from {installed} to {target} (set allow_downgrade: true)"
            )
        return self._install(host, manager, target, installed)

    def _install(self, host: StepHost, manager: str, target: str, installed: str | None) -> str:
        """Install `target` (an older version too: the callers decide), finishing first what an interrupted one left."""
        name = f"{self.params.name}={target}" if manager == "apt" else f"{self.params.name}-{target}"
        # Under the host lock, first: an install of this version that finished meanwhile (one a dropped link or a
        # killed controller left running) is the install.
        done = sh('[ "$({installed})" = {wanted} ] && {{ echo {said}; exit 0; }}; ',
                  installed=installed_command(self.params.name), wanted=f"install ok installed|{target}",
                  said=f"{self.params.name} {target} already installed")
        if manager == "apt":
            # Finish any install an earlier, interrupted run left half done (waiting for another dpkg's lock), then
            # install, waiting for another apt's lock. The package lists are refreshed first only when they lack the
            # version (the preflight refreshed them if they did), or when installing from them fails (stale lists).
            install = sh("{env} apt-get install -y -q --allow-downgrades {wait} -o Dpkg::Options::=--force-confold "
                         "-- {name}", env=APT_ENV, wait=APT_LOCK_WAIT, name=name)
            listed = any(same_version(version, target) for version in host.read(available_probe(self.params.name)))
            then = (sh("{{ {install} || {{ {update} && {install}; }}; }}", install=install, update=APT_UPDATE) if listed
                    else sh("{update} && {install}", update=APT_UPDATE, install=install))
            command = sh("{done}{configure}; {then}", done=done, configure=DPKG_CONFIGURE, then=then)
        else:
            command = sh("{done}yum install -y -- {name} || yum downgrade -y -- {name}", done=done, name=name)
        result = host.run_then_read(command, [installed_probe(self.params.name)], durable=f"package-{self.params.name}",
                                    label=f"{'apt-get' if manager == 'apt' else 'yum'} install {name}")
        if not result.ok:
            errors = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()][-6:]
            raise StepFailed(f"{manager} could not install {self.params.name} {target}: " + " | ".join(errors))
        return f"{self.params.name} {installed or '(none)'} -> {target}"

    def verify(self, host: StepHost) -> Check:
        verified = self.check(host)
        previous = self.remembered.get("previous")
        if not (verified.done and previous):
            return verified
        return Check(True, verified.message, {**(verified.facts or {}), "previous": previous})

    def undone(self, host: StepHost, remembered: dict[str, Any]) -> Check:
        """The version installed before the run is installed again (a package the run installed fresh is kept)."""
        if "previous" not in remembered:  # its apply never read the host: it changed nothing of the package
            return Check(True, f"{self.params.name}: the run never got to install it here: nothing to take back")
        previous = remembered["previous"]
        if previous is None:
            return Check(True, f"{self.params.name} was not installed before the run: kept")
        installed = installed_version(host, self.params.name)
        if same_version(installed, previous):
            return Check(True, f"{self.params.name} {installed} installed, as before the run")
        return Check(False, f"{self.params.name} {installed or '(not fully installed)'} -> {previous}")

    def undo(self, host: StepHost, remembered: dict[str, Any]) -> str:
        """Install the version the run found, downgrading on purpose (the one place a downgrade needs no flag)."""
        previous = str(remembered["previous"])
        return self._install(host, package_manager(host), previous, installed_version(host, self.params.name))

    def _older(self, host: StepHost, manager: str, target: str, installed: str) -> bool:
        if manager == "apt":
            return host.read(older_probe(self.params.name, target))
        script = "import rpm,sys; sys.exit(0 if rpm.labelCompare(('0',sys.argv[1],''),('0',sys.argv[2],''))<0 else 1)"
        result = host.run(sh("python3 -c {script} {target} {installed}", script=script, target=target,
                             installed=installed))
        if result.exited not in (0, 1):  # cannot tell: never guess "not older" and downgrade by accident
            raise StepFailed(f"cannot compare versions {target} and {installed} on this host: {result.tail()}")
        return result.ok


def _held_message(package: str, installed: str | None, held: str) -> str:
    """Why a package on hold refuses the run, and how to release it."""
    if held == "apt-mark":
        return (f"{package} {installed or '(not installed)'} is on hold (apt-mark hold): apt will not upgrade it; "
                f"release it first: apt-mark unhold {package}")
    return (f"{package} {installed or '(not installed)'} is locked by yum versionlock ({held}): yum will not upgrade "
            f"it; release it first: yum versionlock delete {package}")


class VersionParams(Params):
    name: str = Field("scalr-server", pattern=PACKAGE)
    """The package whose installed version is checked."""
    version: str = Field("", pattern=r"^$|" + VERSION)
    """The version the environment should run; empty: not known (the check then only says what is installed)."""


class PackageVersion(Step[VersionParams]):
    """Read-only: `name` is installed at `version`, the environment's expected version (`overhaul verify` gives
    the one its journal knows: the last whole upgrade, rollback or rebuild)."""

    name = "package.version"
    read_only = True

    def probes(self) -> list[Probe]:
        return [installed_probe(self.params.name)]

    def check(self, host: StepHost) -> Check:
        installed = installed_version(host, self.params.name)
        if not self.params.version:
            return Check(True, f"{self.params.name} {installed or '(not installed)'} (no expected version known)",
                         {"version": installed})
        if same_version(installed, self.params.version):
            return Check(True, f"{self.params.name} {installed}, as expected", {"version": installed})
        return Check(False, f"{self.params.name} {installed or '(not installed)'}, expected {self.params.version}",
                     {"version": installed})

    def apply(self, host: StepHost) -> str:
        raise StepFailed(self.check(host).message)
