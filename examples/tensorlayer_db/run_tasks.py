"""A task runner: pull tasks from the database and run them (start one per machine or GPU)."""

import argparse
import os
import time
from pathlib import Path

from tensordb.compat.tensorhub import TensorHub


def main(forever: bool) -> int:
    # a runner only runs scripts from directories its operator lists: here, this example's own
    db = TensorHub(
        project_name=os.environ.get("TENSORDB_PROJECT", "tensorlayer-example"), task_script_dirs=(Path(__file__).parent,)
    )
    ran = 0
    idle_since = time.monotonic()
    while forever or time.monotonic() - idle_since < 10:
        if db.run_top_task(task_name="digits-mlp", sort=[("time", -1)]):
            ran += 1
            idle_since = time.monotonic()
        else:
            time.sleep(0.5)
    db.close()
    return ran


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--forever", action="store_true", help="keep waiting for tasks")
    print(f"ran {main(parser.parse_args().forever)} task(s)")
