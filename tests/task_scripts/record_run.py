# A TensorLayer-style task script: hyper-parameters arrive as globals (marker_file, value).
import os

with open(marker_file, "a") as marker:  # noqa: F821 - a global set by the task runner
    marker.write(os.environ["TENSORDB_JOB_ID"] + "\n")
doubled = value * 2  # noqa: F821
