"""Your own invoke tasks, composing Overhaul's steps in Python: the vendor's upgrade, then a step of your own.

    cd examples/python-upgrade && invoke upgrade --env lab --version 1.1.0 --yes --hosts-dir ../../hosts

The run is Overhaul's own: every preflight on every host before the first change, the environment's lock and
journal (`overhaul history`, `overhaul show`, `overhaul resume --env lab` and `overhaul undo` know it).
"""

from pathlib import Path

from invoke import Exit, task

from overhaul import api

HERE = Path(__file__).parent
APP_TIERS = ("db", "worker", "app")  # reconfigured in this order, each after the one before it is done


def upgrade_runbook() -> api.Runbook:
    """The upgrade of the vendor's procedure, with a marker file on the app hosts once they run the new version."""
    reconfigure = [api.Stage(name=f"reconfigure {role}", step="app.reconfigure", roles=[role], timeout=3600,
                             strategy="serial" if role == "db" else "parallel", params={"package": "scalr-server"})
                   for role in APP_TIERS]
    return api.Runbook(
        name="upgrade-marked",
        params={"version": None},
        stages=[
            api.Stage(name="backup database", step="mysql.backup", roles=["db"], timeout=14400,
                      params={"label": "pre-upgrade-${version}", "password_secret": "mysql_backup_password"}),
            api.Stage(name="stop services", step="services.stop",
                      params={"package": "scalr-server", "version": "${version}"}),
            api.Stage(name="upgrade package", step="package.upgrade", timeout=3600,
                      params={"name": "scalr-server", "version": "${version}"}),
            *reconfigure,
            api.Stage(name="supervisor up", step="supervisor.up"),
            api.Stage(name="services running", step="services.verify", max_failures=0),
            api.Stage(name="mark upgraded", step="local.touch", roles=["app"],  # ours: steps/touch.py
                      params={"path": "/root/upgraded-to-${version}"}),
        ],
    )


@task
def upgrade(c, env="lab", version="latest", yes=False, hosts_dir="hosts"):
    """Upgrade `env` to `version` by the runbook above, with Overhaul's console view."""
    planned = api.plan(upgrade_runbook(), env, params={"version": version}, hosts_dir=hosts_dir,
                       steps_dir=HERE / "steps")
    with api.ConsoleView() as view:  # (the live view stops however the run ends)
        result = api.run(planned, yes=yes, subscribers=[view])
    if result.exit_code:
        raise Exit(f"{result.status}: run {result.run_id}", code=result.exit_code)
