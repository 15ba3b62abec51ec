"""The never-regress suite: pinned cases as files, their runner and the pytest plugin."""
