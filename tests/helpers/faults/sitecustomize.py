"""Fault injection for tests/workflow/test_resume.py (on PYTHONPATH of the workflow's processes only).

Inactive unless ADAMERGE_TEST_PAUSE_AT is set. Then every ``os.replace`` (also reached through
``Path.replace``) whose destination matches that regular expression first appends
"pid src -> dst" to the file ADAMERGE_TEST_PAUSE_MARKER and sleeps ADAMERGE_TEST_PAUSE_SECONDS
(default 120) before renaming. The pipeline publishes every output by such a rename, so the
test can SIGKILL the run at a known point: a job has written its data under a temporary name
(and maybe published some of its outputs) but not the output that matches.
"""

import os

_PATTERN = os.environ.get("ADAMERGE_TEST_PAUSE_AT")

if _PATTERN:
    import re
    import time

    _replace = os.replace

    def _paused_replace(src, dst, *args, **kwargs):
        if re.search(_PATTERN, os.fspath(dst)):
            with open(os.environ["ADAMERGE_TEST_PAUSE_MARKER"], "a") as marker:
                marker.write(f"{os.getpid()} {os.fspath(src)} -> {os.fspath(dst)}\n")
            time.sleep(float(os.environ.get("ADAMERGE_TEST_PAUSE_SECONDS", "120")))
        return _replace(src, dst, *args, **kwargs)

    os.replace = _paused_replace
