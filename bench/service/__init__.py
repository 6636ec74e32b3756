"""The hosted evaluation service: teams send synthetic data or predictions, the host trains and scores on data that
never leaves it.

`settings` (service.yaml), `db` (SQLAlchemy models and the job queue), `scoring` (the answer key adapter),
`bundle` (safe upload checks and unpacking), `worker` (claims and runs jobs), `pages` (the HTML leaderboard),
`app` (the FastAPI application), `client` (what `medsynbench submit --server` sends).
"""
