"""The fixture application (`scalr-server`) as real .deb packages in a local apt repository.

The packages are built with `dpkg-deb` from the scripts in `fixture/`; the repository is a flat
`file:` repository (a `Packages` index beside the .debs) that every lab host mounts read-only.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "scalr-server"
VERSIONS = ("1.0.0", "1.1.0")
FIXTURE = Path(__file__).with_name("fixture")

CONTROL = """\
Package: {package}
Version: {version}
Architecture: all
Maintainer: Overhaul lab <lab@overhaul.invalid>
Depends: supervisor, mariadb-client
Section: admin
Priority: optional
Description: Lab stand-in for Scalr server (Overhaul test fixture)
 Supervised services, scalr-server-manage and scalr-server-ctl, shaped like the real product.
"""

BROKEN_POSTINST = """\
#!/bin/sh
ROLE=; CONF=/etc/scalr-server/scalr-server.conf; [ -r $CONF ] && . $CONF
case "{roles}" in ""|*" $ROLE "*) ;; *) exit 0 ;; esac
echo "scalr-server {version}: post-installation script failed (broken package published by the lab)" >&2
exit 1
"""


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def build_deb(version: str, out_dir: Path, broken: bool = False, broken_on: tuple[str, ...] = ()) -> Path:
    """Build scalr-server_<version>_all.deb into out_dir and return its path.

    `broken`: its post-install script fails (on the hosts of the roles `broken_on` only, if given).
    """
    out = out_dir / f"{PACKAGE}_{version}_all.deb"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)  # the tree's top is the hosts' "/": never ship it 0700
        opt = root / "opt/scalr-server"
        for sub in ("bin", "embedded/bin", "embedded/migrations", "etc/supervisor/conf.d", "var/log"):
            (opt / sub).mkdir(parents=True, exist_ok=True)
        for script in (FIXTURE / "bin").iterdir():
            _install(script, opt / "bin" / script.name, version)
        for script in ("scalr-service", "scalr-mysqld"):
            _install(FIXTURE / "embedded" / script, opt / "embedded/bin" / script, version)
        shutil.copy(FIXTURE / "embedded/supervisord.conf", opt / "embedded/supervisord.conf")
        for migration in (FIXTURE / "migrations").iterdir():
            if _version_key(migration.stem) <= _version_key(version):
                shutil.copy(migration, opt / "embedded/migrations" / migration.name)
        (root / "etc/init.d").mkdir(parents=True)
        _install(FIXTURE / "init.d/scalr", root / "etc/init.d/scalr", version)
        (root / "usr/bin").mkdir(parents=True)
        for tool in ("scalr-server-manage", "scalr-server-ctl"):
            (root / "usr/bin" / tool).symlink_to(f"/opt/scalr-server/bin/{tool}")
        debian = root / "DEBIAN"
        debian.mkdir()
        (debian / "control").write_text(CONTROL.format(package=PACKAGE, version=version))
        if broken:
            roles = f" {' '.join(broken_on)} " if broken_on else ""
            (debian / "postinst").write_text(BROKEN_POSTINST.format(version=version, roles=roles))
            (debian / "postinst").chmod(0o755)
        subprocess.run(
            ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out)],
            check=True, capture_output=True,
        )
    return out


def _install(source: Path, target: Path, version: str) -> None:
    target.write_text(source.read_text().replace("@VERSION@", version))
    target.chmod(0o755)


def fixture_digest() -> str:
    """A hash of the fixture sources: the repository is rebuilt when they change."""
    digest = hashlib.sha256(CONTROL.encode())
    for path in sorted(FIXTURE.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(FIXTURE).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def ensure_repository(repo: Path) -> Path:
    """Build the packages of every version into repo (once per fixture change) and index them."""
    stamp = repo / ".fixture-digest"
    if stamp.exists() and stamp.read_text() == fixture_digest():
        return repo
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    for version in VERSIONS:
        build_deb(version, repo)
    write_index(repo)
    stamp.write_text(fixture_digest())
    return repo


def write_index(repo: Path) -> None:
    """Write the Packages index of a flat repository from the .deb files it holds."""
    entries = []
    for deb in sorted(repo.glob("*.deb")):
        control = subprocess.run(
            ["dpkg-deb", "--field", str(deb)], check=True, capture_output=True, text=True
        ).stdout.rstrip("\n")
        data = deb.read_bytes()
        entries.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"MD5sum: {hashlib.md5(data).hexdigest()}\nSHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    tmp = repo / "Packages.tmp"
    tmp.write_text("\n".join(entries))
    tmp.rename(repo / "Packages")


def publish_broken(repo: Path, version: str = "1.1.1", roles: tuple[str, ...] = ()) -> None:
    """Fault: add a package whose installation fails (on the hosts of `roles` only, if given), as a newer version
    than the good ones."""
    build_deb(version, repo, broken=True, broken_on=roles)
    write_index(repo)


def unpublish(repo: Path, version: str) -> None:
    """Remove one version from the repository (undoes `publish_broken`)."""
    (repo / f"{PACKAGE}_{version}_all.deb").unlink(missing_ok=True)
    write_index(repo)
