"""`mysql.restore`: the database back as it was in a verified backup. It destroys data, on purpose.

Everything written to the database after the backup was taken is lost: the dump drops and recreates
every table it holds. That is what a rollback wants, and why this step proves all it can before:
the file is the one the backup step journaled (same size, same SHA-256, checked again under the host
lock right before the restore), the account may create and drop tables, the data folder has room.

The restore is one durable command under the host's lock (`mysql-restore`): it goes on to its end
if the controller dies, and it writes a marker beside the backup (`<file>.restored`: the run and the
time) only when mysql succeeded. A marker means "restored": a resumed run, a retry, or the same
rollback run again finds it and restores nothing (to restore the same file once more on purpose,
remove the marker). `check` (and so `verify`) proves a marked restore each time it looks: every table of the
dump exists, and the rows of `proof_table` (the application's schema version) are the dump's rows.
"""

from __future__ import annotations

import re

from overhaul.steps.mysql import option_file, space_for
from pydantic import Field

from overhaul.command import bash, sh
from overhaul.context import Probe, StepHost, file_probe
from overhaul.errors import StepFailed
from overhaul.step import Check, Params, Step

OPTION_FILE = """\
set -u -o pipefail
cnf=$(mktemp)
trap 'rm -f "$cnf"' EXIT
cat > "$cnf"
ask() {{ {mysql} --defaults-extra-file="$cnf" -N -B -e "$1" 2>&1 | tr '\\n' ' '; }}
"""

# The global privileges a restore of a full dump needs (it drops, creates and fills every table it holds).
PRIVILEGES = ("SELECT COALESCE(GROUP_CONCAT(p), '') FROM (SELECT 'CREATE' p UNION SELECT 'DROP' UNION SELECT 'INSERT' "
              "UNION SELECT 'ALTER') need WHERE p NOT IN (SELECT privilege_type FROM information_schema.user_privileges "
              "WHERE grantee = CONCAT(\"'\", REPLACE(CURRENT_USER(), '@', \"'@'\"), \"'\"))")

# Preflight, read-only: the file's size and SHA-256 and its uncompressed size (one read of the file), the
# database answers as the restore user with the privileges a restore needs, the free space of its data folder.
PROBE = OPTION_FILE + """\
f={file}
[ -f "$f" ] || {{ echo "missing=yes"; exit 0; }}
echo "size=$(stat -c %s "$f")"
sum=$(mktemp)
raw=$( (tee >(sha256sum > "$sum") < "$f"; wait $!) | zcat 2>/dev/null | wc -c)
echo "sha256=$(cut -d' ' -f1 "$sum")"; rm -f "$sum"
echo "raw=$raw"
datadir=$(ask 'SELECT @@datadir')
datadir=${{datadir% }}
echo "datadir=$datadir"
echo "lacks=$(ask {privileges})"
echo "free=$(df -P -B1 "$datadir" 2>/dev/null | tail -n 1 | tr -s ' ' | cut -d' ' -f4)"
"""

RESTORE = OPTION_FILE + """\
set -e
f={file}
marker={marker}
# Under the host lock: a restore of this file that finished meanwhile (a killed controller's) is the restore.
if [ -s "$marker" ]; then echo "already restored by run $(cat "$marker")"; exit 0; fi
[ "$(stat -c %s -- "$f")" = {size} ] || {{ echo "its size is no longer "{size}" bytes" >&2; exit 3; }}
echo {sha256}"  $f" | sha256sum --status -c - || {{ echo "its SHA-256 is no longer "{sha256} >&2; exit 3; }}
zcat "$f" | {mysql} --defaults-extra-file="$cnf" || {{ echo "mysql exited $?: the database may be half restored" >&2; exit 1; }}
echo {run_id}" $(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$marker.new" && mv "$marker.new" "$marker"
echo "restored $f"
"""

# The proof, after the restore: what the dump holds (its databases, tables and the proof table's rows), the
# tables the database has now, and the proof table's rows now (dumped the same way, so the lines compare).
PROOF = OPTION_FILE + """\
echo {mark}" dump"
zcat -- {file} | grep -a -E {lines}
echo {mark}" tables"
{mysql} --defaults-extra-file="$cnf" -N -B -e \
  "SELECT CONCAT(table_schema, '.', table_name) FROM information_schema.tables" 2>&1 || echo "!! failed: exit $?"
echo {mark}" rows"
{rows}
"""
ROWS = ('{mysqldump} --defaults-extra-file="$cnf" --compact --no-create-info -- {database} {table} 2>&1 '
        '|| echo "!! failed: exit $?"')
MARK = "::overhaul-proof::"  # heads each section of the proof's output


class RestoreParams(Params):
    backup: str = Field(pattern=r"^/[^\n]*\.gz$")
    """The backup to restore: the path of a gzip'ed mysqldump on the db host (the backup step's journaled `path`)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """The SHA-256 the backup step journaled for it: a file that no longer matches is refused."""
    size: int = Field(ge=1)
    """The size in bytes the backup step journaled for it: a file that no longer matches is refused."""
    user: str = Field("root", pattern=r"^[A-Za-z0-9_.@%-]+$")
    """The database user the restore runs as: it must create, drop, fill and alter every table of the dump (a
    full dump holds the `mysql` system schema too, so in practice the administrator; a backup user that only
    reads cannot restore, and preflight says so)."""
    password_secret: str | None = None
    """The inventory secret holding that user's password (sent on stdin, never on a command line); none: the user
    signs in without one (root by MariaDB's unix_socket authentication, when the SSH user is root)."""
    mysql: str = "mysql"
    """The client command on the db host the dump is fed to."""
    mysqldump: str = "mysqldump"
    """The dump command on the db host that reads `proof_table` back, to compare it with the dump's rows."""
    proof_table: str | None = Field("scalr.schema_version", pattern=r"^[A-Za-z0-9_$]+\.[A-Za-z0-9_$]+$")
    """DATABASE.TABLE whose rows must equal the dump's after the restore (the application's schema version);
    none: only the dump's tables are proven back."""
    space_factor: float = Field(1.0, gt=0)
    """Free space needed in the database's data folder: the dump's uncompressed size times this."""


class MysqlRestore(Step[RestoreParams]):
    """Restore the database from a verified backup: destroys everything written after the backup, on purpose."""

    name = "mysql.restore"
    reversible = False
    irreversible = "the database as it was before the restore (everything written after the backup) is gone"

    @property
    def marker(self) -> str:
        return f"{self.params.backup}.restored"

    def secrets(self) -> list[str]:
        return [self.params.password_secret] if self.params.password_secret else []

    def probes(self) -> list[Probe]:
        return [file_probe(self.marker)]

    def _restored_by(self, host: StepHost) -> str:
        """The marker's "<run> <time>" ("" when this backup was never restored)."""
        return host.read(file_probe(self.marker))

    def preflight(self, host: StepHost) -> Check:
        """Restored already, or: the file matches the journal, the user may restore, the data folder has room."""
        done = self._restored_by(host)
        if done:
            return Check(True, f"{self.params.backup} already restored by run {done}")
        script = sh(PROBE, mysql=self.params.mysql, file=self.params.backup, privileges=PRIVILEGES)
        probe = dict(line.partition("=")[::2] for line in
                     host.run(bash(script), stdin=self._credentials(host)).stdout.splitlines())
        backup = self.params.backup
        if probe.get("missing"):
            return Check(False, f"backup {backup} does not exist on this host")
        size, digest = probe.get("size", ""), probe.get("sha256", "")
        if size != str(self.params.size) or digest != self.params.sha256:
            return Check(False, f"backup {backup} does not match the journal: {size or '?'} bytes, sha256 {digest or '?'}; "
                                f"expected {self.params.size} bytes, sha256 {self.params.sha256}: refusing to restore it")
        datadir = probe.get("datadir", "").strip()
        if not datadir.startswith("/"):
            return Check(False, f"the database does not answer as {self.params.user!r}: {datadir or '(no output)'}")
        lacks = probe.get("lacks", "").strip()
        if lacks:
            return Check(False, f"{self.params.user!r} cannot restore a dump: it lacks the global privileges {lacks}")
        raw = probe.get("raw", "")
        if not raw.isdigit():
            return Check(False, f"cannot read the uncompressed size of {backup}")
        room = space_for(datadir, probe.get("free", ""), "uncompressed dump", int(raw), self.params.space_factor)
        return Check(room.done, f"backup {backup} matches the journal; the database answers; {room.message}"
                     if room.done else room.message)

    def check(self, host: StepHost) -> Check:
        done = self._restored_by(host)
        if not done:
            return Check(False, f"restore {self.params.backup}: destroys what was written after it")
        # Proven each time, not only after this run's own apply: a killed controller's restore finished on the host
        # without anyone looking at what it left.
        proof = self._proven(host)
        if not proof.done:
            return Check(False, f"restored by run {done}, but {proof.message}")
        return Check(True, f"{self.params.backup} restored by run {done}: {proof.message}",
                     {"backup": self.params.backup, "sha256": self.params.sha256, "restored_by": done.split()[0],
                      "proven": proof.message})

    def apply(self, host: StepHost) -> str:
        script = sh(RESTORE, mysql=self.params.mysql, file=self.params.backup, marker=self.marker,
                    size=self.params.size, sha256=self.params.sha256, run_id=host.run_id)
        result = host.run(bash(script), stdin=self._credentials(host), durable="mysql-restore",
                          label=f"gunzip < {self.params.backup} | {self.params.mysql}")
        host.forget()
        if result.exited == 3:
            raise StepFailed(f"backup {self.params.backup} changed since the preflight ({result.tail()}): nothing restored")
        if not result.ok:
            raise StepFailed(f"restore of {self.params.backup} failed (exit {result.exited}): {result.tail()}")
        return result.stdout.strip().splitlines()[-1] if result.stdout.strip() else f"restored {self.params.backup}"

    def _proven(self, host: StepHost) -> Check:
        """Every table of the dump exists, and the proof table's rows are the dump's."""
        dump, tables, rows = self._proof(host)
        if not dump["tables"]:
            return Check(False, f"found no table in {self.params.backup}: cannot prove the restore")
        missing = sorted(set(dump["tables"]) - tables)
        if missing:
            return Check(False, f"tables of the dump missing after the restore: {', '.join(missing[:10])}")
        proven = f"{len(dump['tables'])} tables of the dump back"
        if self.params.proof_table:
            if self.params.proof_table not in dump["tables"]:
                return Check(False, f"the dump holds no table {self.params.proof_table}: cannot prove the restore")
            if rows != dump["rows"]:
                return Check(False, f"{self.params.proof_table} is {' '.join(rows) or '(empty)'}, the dump has "
                                    f"{' '.join(dump['rows']) or '(empty)'}")
            proven += f", {self.params.proof_table} as in the dump"
        return Check(True, proven)

    def _proof(self, host: StepHost) -> tuple[dict[str, list[str]], set[str], list[str]]:
        """What the dump holds (tables as DB.TABLE, the proof table's INSERT lines), the tables the database has
        now, and the proof table's INSERT lines now."""
        database, _, table = (self.params.proof_table or ".").partition(".")
        rows = sh(ROWS, mysqldump=self.params.mysqldump, database=database, table=table) if self.params.proof_table \
            else sh("true")
        lines = "^(USE `|CREATE TABLE `" + (f"|INSERT INTO `{re.escape(table)}` " if table else "") + ")"
        script = sh(PROOF, mysql=self.params.mysql, file=self.params.backup, lines=lines, rows=rows, mark=MARK)
        result = host.run(bash(script), stdin=self._credentials(host))
        sections = dict(part.partition("\n")[::2] for part in result.stdout.split(MARK + " ")[1:])
        for name in ("tables", "rows"):
            if "!! failed" in sections.get(name, ""):
                raise StepFailed(f"cannot read the database to prove the restore: {sections[name].strip()}")
        dump: dict[str, list[str]] = {"tables": [], "rows": []}
        current = ""
        for line in sections.get("dump", "").splitlines():
            if line.startswith("USE `"):
                current = line[5:].split("`")[0]
            elif line.startswith("CREATE TABLE `"):
                dump["tables"].append(f"{current}.{line[14:].split('`')[0]}")
            elif current == database and line.startswith("INSERT INTO `"):
                dump["rows"].append(line)
        now = [line for line in sections.get("rows", "").splitlines() if line.startswith("INSERT INTO `")]
        return dump, set(sections.get("tables", "").split()), now

    def _credentials(self, host: StepHost) -> str:
        return option_file(host, self.params.user, self.params.password_secret)
