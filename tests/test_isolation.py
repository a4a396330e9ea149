"""The test suite leaves the operator's own checkout alone (its journal, its runs' logs)."""

from __future__ import annotations


def test_tests_never_write_into_the_checkouts_own_journal_or_logs():
    from overhaul.settings import journal_path, outputs_dir, project_root

    root = project_root().resolve()
    for path in (journal_path(), outputs_dir()):
        assert not path.resolve().is_relative_to(root), path
