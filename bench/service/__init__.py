"""The hosted evaluation service: teams send synthetic data or predictions, the host trains and scores on data that
never leaves it.

`settings` (service.yaml), `db` (SQLAlchemy models and the job queue), `scoring` (the answer key adapter),
`bundle` (safe upload checks and unpacking), `gate` (token, size and timeout checks before a body is read, the
access log), `worker` (claims jobs and runs each in a `sandbox`ed child process under resource limits), `pages`
(the HTML leaderboard), `app` (the FastAPI application), `client` (what `medsynbench submit --server` sends).
"""
