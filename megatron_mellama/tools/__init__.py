"""Command-line tools; `tools/*.py` and the `mellama-*` console scripts run their `main()`."""
