# A task script that does nothing: bench/loop_latency.py times how fast a worker starts it, not what it does.
