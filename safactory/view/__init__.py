"""`safactory view`: a read-only web app over the trajectory store and the run directories.

Pages: runs (status, envs, versions, best held-out success, unsafe rate, gate decisions), one
run (live curves with gate decisions on the time axis, its versions and their lineage), the
trajectories (filtered and paginated in the database), one trajectory (turns, tool calls,
verdicts, integrity, a token view shaded by behaviour log-prob, the versions trained on it)
and evaluations side by side. `create_app` builds the app, `serve_view` serves it
(`safactory.view.app`); every part sits in a file of its own beside it.
"""
