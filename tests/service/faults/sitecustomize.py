"""Fault injection for the service tests, loaded only by processes whose PYTHONPATH names this folder.

``QUANTDAG_FAULT=<action>:<kind>`` acts when a flow run is about to write the MANIFEST of an
artifact of ``kind`` (every other file of the artifact is already in place, so this is the
worst moment to die): ``raise`` fails the step, ``pause`` writes a marker file (pid, process
group, session) to ``QUANTDAG_FAULT_DIR`` and sleeps until the test kills the process. A fault fires once
per flow run (``PREFECT__FLOW_RUN_ID``), so a retry of the same flow run gets past it, as after a
transient failure.
"""

import json
import os
import time

_SPEC = os.environ.get("QUANTDAG_FAULT", "")
_FLOW_RUN = os.environ.get("PREFECT__FLOW_RUN_ID", "")

if _SPEC and _FLOW_RUN:
    from quantdag.runtime import store as _store

    _ACTION, _KIND = _SPEC.split(":", 1)
    _DIR = os.environ["QUANTDAG_FAULT_DIR"]
    _original = _store.ArtifactStore._write_atomic

    def _faulty(self, path, data):
        marker = os.path.join(_DIR, f"{_FLOW_RUN}-{_ACTION}-{_KIND}.json")
        if f"/objects/{_KIND}/" in path and not os.path.exists(marker):
            info = {"pid": os.getpid(), "pgid": os.getpgid(0), "sid": os.getsid(0), "ppid": os.getppid(),
                    "parent_pgid": os.getpgid(os.getppid()), "path": path,
                    "secrets_in_env": sorted(k for k in ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD")
                                              if os.environ.get(k))}
            with open(f"{marker}.tmp", "w") as handle:
                json.dump(info, handle)
            os.replace(f"{marker}.tmp", marker)
            if _ACTION == "raise":
                raise RuntimeError(f"injected fault: writing the manifest of {path} failed")
            while True:
                time.sleep(60)
        return _original(self, path, data)

    _store.ArtifactStore._write_atomic = _faulty
