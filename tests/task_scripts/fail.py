# A task script that fails: the job must be marked failed with this output.
print("about to fail")
raise RuntimeError("boom from the task script")
