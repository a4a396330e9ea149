# steps/touch.py in your repository (or a module of a package with an `overhaul.steps` entry point)
"""`local.touch`: an empty file exists at a path (the example of the docs' "Writing a step")."""

import posixpath
from typing import Any

from overhaul.sdk import Check, Field, Params, Step, StepFailed, StepHost, sh


class TouchParams(Params):
    path: str = Field(pattern="^/")
    """The file that must exist on the host: an absolute path (created empty when missing)."""


class Touch(Step[TouchParams]):
    """An empty file exists at `path` (created when missing; an existing file is left as it is)."""

    name = "local.touch"
    reversible = True  # an undo deletes the file this step created (see undone and undo)

    def preflight(self, host: StepHost) -> Check:
        # Read-only, before the run changes anything anywhere: could apply succeed here, now?
        folder = posixpath.dirname(self.params.path)
        writable = host.run(sh("test -d {folder} && test -w {folder}", folder=folder)).ok
        return Check(writable, f"{folder} is {'' if writable else 'not '}a writable folder")

    def check(self, host: StepHost) -> Check:
        # Read-only: is the work already done? sh() quotes every value it inserts: a path with a
        # space or a `;` stays one path.
        exists = host.run(sh("test -f {path}", path=self.params.path)).ok
        return Check(exists, f"{self.params.path} {'exists' if exists else 'is missing'}")

    def apply(self, host: StepHost) -> str:
        # Before the change, what an undo needs (journaled with the pair, JSON values only). apply
        # runs only when check found no file: the file an undo deletes is one this step created.
        self.remembered["created"] = self.params.path
        result = host.run(sh("touch -- {path}", path=self.params.path))
        if not result.ok:
            raise StepFailed(f"touch exited {result.exited}: {result.tail()}")
        return f"created {self.params.path}"

    def verify(self, host: StepHost) -> Check:
        # After apply: prove the work holds. The default is `check` again, as here; a step whose apply
        # can exit 0 without the effect (a service that starts, then dies) proves more here.
        return self.check(host)

    def undone(self, host: StepHost, remembered: dict[str, Any]) -> Check:
        # Read-only, like check: is this host's change taken back? From what apply remembered.
        created = remembered.get("created")
        if created is None:
            return Check(True, "this step created nothing here")
        gone = not host.run(sh("test -e {path}", path=created)).ok
        return Check(gone, f"{created} {'is gone' if gone else 'is still there'}")

    def undo(self, host: StepHost, remembered: dict[str, Any]) -> str:
        # Called only when undone says the change is still there.
        result = host.run(sh("rm -f -- {path}", path=remembered["created"]))
        if not result.ok:
            raise StepFailed(f"rm exited {result.exited}: {result.tail()}")
        return f"removed {remembered['created']}"
