"""`mysql.backup`: a full database dump, gzip'ed on the db host, and proven whole before it counts.

The password reaches mysqldump through a `--defaults-extra-file` made by mktemp (mode 0600) from
stdin and removed on exit: never on a command line, never in a log. A backup counts when `gzip -t`
passes, it is not empty, its last line is mysqldump's "-- Dump completed" trailer, and its SHA-256
is recorded beside it (`.sha256`, written only after those checks). `check` finds a verified backup
with the same label younger than `max_age_hours`, so a run repeated soon after does not dump again.
"""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path

from pydantic import Field

from overhaul.command import Command, bash, join, sh
from overhaul.context import StepHost
from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step

VERIFY = """\
f={file}
gzip -t -- "$f" && [ -s "$f" ] && (cd -- "$(dirname -- "$f")" && sha256sum --status -c -- "$(basename -- "$f").sha256") \
  && [ "$(zcat "$f" | tail -n 1 | cut -c1-17)" = "-- Dump completed" ]
"""

DUMP = """\
set -eu -o pipefail
# Under the host lock: a dump of this run that finished meanwhile (a killed controller's) is the backup.
for done in {folder}/{label}-*-{run_id}.sql.gz; do
  if [ -e "$done.sha256" ] && bash -c {verify_done} "$done"; then
    echo "$done"; stat -c %s "$done"; cut -d' ' -f1 "$done.sha256"; exit 0
  fi
done
cnf=$(mktemp)
partial={partial}
trap 'rm -f "$cnf" "$partial"' EXIT
cat > "$cnf"
{dump} --defaults-extra-file="$cnf" {options} --all-databases | gzip > "$partial"
gzip -t "$partial"
[ -s "$partial" ]
[ "$(zcat "$partial" | tail -n 1 | cut -c1-17)" = "-- Dump completed" ]
mv -- "$partial" {final}
(cd -- {folder} && sha256sum -- {name} > {name}.sha256)
echo {final}
stat -c %s -- {final}
cut -d' ' -f1 -- {final}.sha256
"""


# Preflight, read-only: the database answers with the backup credentials (and says how big its data
# is), the nearest existing folder on the backup path is writable, and how much space is free there.
PROBE = """\
set -u
cnf=$(mktemp)
trap 'rm -f "$cnf"' EXIT
cat > "$cnf"
echo "data=$({mysql} --defaults-extra-file="$cnf" -N -B -e \
  'SELECT COALESCE(SUM(data_length + index_length), 0) FROM information_schema.tables' 2>&1 | tr '\\n' ' ')"
d={folder}
while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done
if [ -d "$d" ] && [ -w "$d" ]; then echo "writable=yes"; else echo "writable=$d"; fi
echo "free=$(df -P -B1 -- "$d" | tail -n 1 | tr -s ' ' | cut -d' ' -f4)"
echo "last=$(cd -- {folder} 2>/dev/null && ls -1t -- {pattern} 2>/dev/null | head -n 1 | xargs -r stat -c %s)"
"""
MIN_FREE = 1024 * 1024


def option_file(host: StepHost, user: str, password_secret: str | None) -> str:
    """The option file for mysql/mysqldump (sent on stdin, never on a command line). Without a secret it holds
    no password: the account signs in another way (root by MariaDB's unix_socket, over the local socket)."""
    lines = ["[client]", f"user={user}"]
    if password_secret:
        password = host.secret(password_secret)
        if "\n" in password:
            raise StepFailed(f"secret {password_secret!r} contains a newline: an option file cannot hold it")
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        lines.append(f'password="{quoted}"')
    return "\n".join(lines) + "\n"


def space_for(where: str, free: str, basis: str, size: int, factor: float) -> Check:
    """Is `free` (df's answer, in bytes) enough at `where` for `size` bytes (`basis` says what they are) x `factor`?"""
    if not free.isdigit():
        return Check(False, f"cannot measure free space for {where}")
    needed = max(int(size * factor), MIN_FREE)
    if int(free) < needed:
        return Check(False, f"not enough free space for {where}: {free} bytes free, need {needed} ({basis} {size} x {factor:g})")
    return Check(True, f"{free} bytes free, need {needed}")


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


class BackupParams(Params):
    label: str = Field("backup", pattern=r"^[A-Za-z0-9._-]+$")
    """Names the backup (`LABEL-<time>-<run>.sql.gz`): a fresh verified backup of this label counts as done."""
    backup_dir: str = Field("/var/backups/overhaul", pattern=r"^/[^\n]*$")
    """Folder on the db host the backups are written to."""
    user: str = Field("backup", pattern=r"^[A-Za-z0-9_.@%-]+$")
    """The database user the dump runs as."""
    password_secret: str = "mysql_backup_password"
    """The name of the inventory secret holding that user's password (sent on stdin, never on a command line)."""
    mysqldump: str = "mysqldump"
    """The dump command on the db host."""
    mysql: str = "mysql"
    """The client command preflight asks the database with."""
    single_transaction: bool = True
    """Dump with --single-transaction (a consistent InnoDB snapshot without locking tables)."""
    routines: bool = True
    """Include stored routines and events (--routines --events)."""
    keep: int = Field(5, ge=1)
    """Retention: the newest N backups of this label stay, older ones are removed."""
    max_age_hours: float = Field(1, gt=0)
    """Another run's backup older than this is not trusted: a new one is made."""
    space_factor: float = Field(1.5, ge=1)
    """Free space needed before a dump: the last backup's size (first: the data size) times this."""
    s3_bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    """Also keep a copy in this S3 bucket (uploaded from the controller, size and SHA-256 checked)."""
    s3_prefix: str = ""
    """Key prefix of the S3 copy, e.g. 'production/'."""
    s3_region: str | None = Field(None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    """The S3 bucket's region."""
    s3_endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s'\"`$;|&<>]+$")
    """An S3-compatible endpoint instead of AWS's own."""


class MysqlBackup(Step[BackupParams]):
    name = "mysql.backup"
    reversible = True  # a backup is kept: nothing to take back (harmless to keep)

    def secrets(self) -> list[str]:
        return [self.params.password_secret]

    def preflight(self, host: StepHost) -> Check:
        """A usable backup is already there, or: the database answers, the folder is writable, the dump fits."""
        existing = self._verified_backup(host)
        if existing is not None:
            return Check(True, f"verified backup {existing['path']} already there")
        return self._can_dump(host)

    def _can_dump(self, host: StepHost) -> Check:
        script = sh(PROBE, mysql=self.params.mysql, folder=self.params.backup_dir, pattern=self._pattern())
        probe = dict(line.partition("=")[::2] for line in
                     host.run(bash(script), stdin=self._credentials(host)).stdout.splitlines())
        data = probe.get("data", "").strip()
        if not data.isdigit():
            return Check(False, f"the database does not answer as {self.params.user!r}: {data or '(no output)'}")
        if probe.get("writable") != "yes":
            return Check(False, f"cannot write {self.params.backup_dir}: {probe.get('writable') or 'unknown'} is not writable")
        last = probe.get("last", "")
        # A first backup is estimated from the database's data size (a dump is rarely bigger than the data).
        basis, size = ("last backup", int(last)) if last.isdigit() else ("data size", int(data))
        room = space_for(self.params.backup_dir, probe.get("free", ""), basis, size, self.params.space_factor)
        return Check(room.done, f"database answers ({data} bytes of data), {room.message}" if room.done else room.message)

    def check(self, host: StepHost) -> Check:
        local = self._verified_backup(host)
        if local is None:
            return Check(False, f"no verified {self.params.label} backup younger than {self.params.max_age_hours:g} h")
        if self.params.s3_bucket and not self._s3_copy_matches(local):
            return Check(False, f"{local['path']} is not yet in s3://{self.params.s3_bucket}/{self._s3_key(local)}")
        where = f", copy in s3://{self.params.s3_bucket}/{self._s3_key(local)}" if self.params.s3_bucket else ""
        return Check(True, f"verified backup {local['path']} ({local['size']} bytes{where})", local)

    def _verified_backup(self, host: StepHost) -> dict | None:
        """The newest backup of this label, younger than max_age, that passes every check (a fact, until an apply)."""
        return host.fact(f"backup {self.params.backup_dir} {self.params.label}", self._find_backup)

    def _find_backup(self, host: StepHost) -> dict | None:
        listing = host.run(sh(
            "cd -- {folder} 2>/dev/null && for f in $(ls -1t -- {pattern} 2>/dev/null); do "
            '[ -e "$f.sha256" ] && [ ! -e "$f.restored" ] && echo "$(date +%s) $(stat -c "%Y %s" "$f") $f"; done',
            folder=self.params.backup_dir, pattern=self._pattern(),
        )).stdout.split("\n")
        for line in filter(None, listing):
            now, modified, size, name = line.split(maxsplit=3)
            # This run's own backup always counts (a resume after the services were stopped cannot dump
            # again); another run's only while it is fresh, so a stopped run's old dump is no safety net. A restored
            # one never does (listed above): the database has moved on since it was restored.
            fresh = (int(now) - int(modified)) / 3600 <= self.params.max_age_hours  # the host's own clock
            if not (fresh or name.endswith(f"-{host.run_id}.sql.gz")):
                continue
            path = f"{self.params.backup_dir}/{name}"
            if host.run(bash(sh(VERIFY, file=path))).ok:
                digest = host.run(sh("cut -d' ' -f1 -- {file}", file=f"{path}.sha256")).stdout.strip()
                return {"path": path, "size": int(size), "sha256": digest}
        return None

    def _pattern(self, label: str | None = None) -> Command:
        """Backups of a label: LABEL-<UTC timestamp>-<run id>.sql.gz (so label 2.0 never matches 2.0-rc1); a glob."""
        return sh("{label}-[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9]*Z-*.sql.gz", label=label or self.params.label)

    def _s3(self):
        import boto3

        return boto3.client("s3", region_name=self.params.s3_region, endpoint_url=self.params.s3_endpoint_url)

    def _s3_key(self, backup: dict) -> str:
        return self.params.s3_prefix + backup["path"].rsplit("/", 1)[-1]

    def _s3_copy_matches(self, backup: dict) -> bool:
        from botocore.exceptions import ClientError

        try:
            head = self._s3().head_object(Bucket=self.params.s3_bucket, Key=self._s3_key(backup), ChecksumMode="ENABLED")
        except ClientError:
            return False
        return head["ContentLength"] == backup["size"] and head.get("Metadata", {}).get("sha256") == backup["sha256"] \
            and head.get("ChecksumSHA256", _b64(backup["sha256"])) == _b64(backup["sha256"])

    def _upload(self, host: StepHost, backup: dict) -> None:
        """Copy the backup to S3 (S3 checks the SHA-256 on arrival), then check size and checksum again."""
        with tempfile.TemporaryDirectory(prefix="overhaul-backup-") as tmp:
            local = Path(tmp) / "backup.sql.gz"
            host.download(backup["path"], local)
            with open(local, "rb") as body:
                self._s3().put_object(Bucket=self.params.s3_bucket, Key=self._s3_key(backup), Body=body,
                                      ChecksumSHA256=_b64(backup["sha256"]), Metadata={"sha256": backup["sha256"]})
        if not self._s3_copy_matches(backup):
            raise StepFailed(f"the S3 copy of {backup['path']} does not match its size and SHA-256")

    def verify(self, host: StepHost) -> Check:
        return self.check(host)

    def apply(self, host: StepHost) -> str:
        backup = self._verified_backup(host)
        message = f"verified backup {backup['path']} already there" if backup else self._dump(host)
        if self.params.s3_bucket:
            backup = backup or self._verified_backup(host)
            if backup is None:
                raise StepFailed("the new backup does not verify")
            self._upload(host, backup)
            message += f"; copied to s3://{self.params.s3_bucket}/{self._s3_key(backup)}"
        return message

    def _dump(self, host: StepHost) -> str:
        folder = self.params.backup_dir
        ready = self._can_dump(host)
        if not ready.done:
            raise StepFailed(f"{ready.message}; nothing was stopped")
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"{self.params.label}-{stamp}-{host.run_id}.sql.gz"
        final = f"{folder}/{name}"
        options = join((flags for flags, wanted in ((sh("--single-transaction"), self.params.single_transaction),
                                                    (sh("--routines --events"), self.params.routines)) if wanted), " ")
        script = sh(
            DUMP, partial=final + ".partial", final=final, folder=folder, name=name, dump=self.params.mysqldump,
            options=options, label=self.params.label, run_id=host.run_id,
            verify_done=sh(VERIFY, file=sh('"$0"')).text,
        )
        # 0700 only when the step creates the folder: an existing one (say /tmp) keeps its mode.
        host.run(sh("[ -d {folder} ] || mkdir -p -m 700 -- {folder}", folder=folder))
        result = host.run(bash(script), stdin=self._credentials(host), durable=f"mysql-backup-{self.params.label}",
                          label=f"{self.params.mysqldump} | gzip > {final}")
        host.forget()  # a new backup exists (or a failed dump left its folder changed)
        if not result.ok:
            raise StepFailed(f"backup failed (exit {result.exited}): {result.tail()}")
        path, size, digest = result.stdout.split()[-3:]
        self._prune(host, folder)
        return f"backup {path} ({size} bytes, sha256 {digest[:12]}...)"

    def _credentials(self, host: StepHost) -> str:
        return option_file(host, self.params.user, self.params.password_secret)

    def _prune(self, host: StepHost, folder: str) -> None:
        host.run(sh("cd -- {folder} && ls -1t -- {pattern} | tail -n +{first} | "
                    'while read -r old; do rm -f -- "$old" "$old.sha256" "$old.restored"; done',
                    folder=folder, pattern=self._pattern(), first=self.params.keep + 1))
