"""Task jobs (TensorLayer's task distribution): run a script file on the worker in a subprocess.

Only scripts inside the worker's ``task_script_dirs`` run (links resolved), with an environment
holding what they need to connect back and no secrets (see :mod:`tensordb.infra.trusted`). The
hyper-parameters become the script's globals (TensorLayer's convention), and the values of the
task's ``save_keys`` found in its globals afterwards become the job's result. A failing script marks
the job failed with its output; it never hangs the queue, and cancellation kills it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tensordb.errors import TaskScriptError
from tensordb.infra.trusted import resolve_task_script, task_environment
from workers.context import JobCancelled, JobContext

OUTPUT_TAIL = 4000


def run_task(context: JobContext) -> dict[str, Any]:
    spec = context.job["spec"]
    script = resolve_task_script(spec["script"], context.settings)
    if not script.is_file():
        raise TaskScriptError(f"task script {script} does not exist on worker {context.worker}: install it there first")
    with tempfile.TemporaryDirectory(prefix="tensordb-task-") as scratch:
        parameters, result_file, output_file = (Path(scratch) / name for name in ("parameters.json", "result.json", "output.log"))
        parameters.write_text(json.dumps({"globals": spec.get("hyperparameters", {}), "save_keys": spec.get("save_keys", [])}))
        with open(output_file, "wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-m", "workers.task_runner", str(script), str(parameters), str(result_file)],
                cwd=script.parent,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=task_environment(context.settings, context.job_id, os.environ),
                start_new_session=True,
            )
            while process.poll() is None:
                if context.stop.wait(0.2):
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
                    raise JobCancelled(context.stop_reason or "stopped")
        tail = output_file.read_text(errors="replace")[-OUTPUT_TAIL:]
        if process.returncode != 0:
            raise TaskScriptError(f"{script.name} exited with code {process.returncode}; output:\n{tail}")
        return {**json.loads(result_file.read_text()), "output": tail}
