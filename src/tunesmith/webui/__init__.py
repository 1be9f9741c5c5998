"""`tunesmith webui`: the commands from a browser (app.py), with forms generated from the config (forms.py)
and runs as CLI subprocesses (jobs.py)."""
