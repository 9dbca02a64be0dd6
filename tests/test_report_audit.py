"""The report shows the audit's results only when the audit recorded done is this config's: `audit/` holds the last
audit run in the run directory, so a record done under another config's audit key is not shown."""

from __future__ import annotations

from gradfilter_ray import report


def test_only_an_audit_done_under_this_configs_key_is_shown():
    done = {"stages": {"audit": {"status": "done", "key": "a" * 16, "headline": "at 10% gsnr kept 1 planted row"}}}
    assert report.audit_stage_done(done, "a" * 16)
    assert not report.audit_stage_done(done, "b" * 16)  # another config's audit
    running = {"stages": {"audit": {"status": "running", "key": "a" * 16}}}
    assert not report.audit_stage_done(running, "a" * 16) and not report.audit_stage_done({"stages": {}}, "a" * 16)
    assert report.audit_stage_done(done)  # no key given: any audit done
