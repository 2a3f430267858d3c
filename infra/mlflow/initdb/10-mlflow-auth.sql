-- Runs once, when the PostgreSQL volume is first created: a separate database for MLflow's users and
-- permissions (the basic-auth app), owned by the same role as the tracking database.
CREATE DATABASE mlflow_auth OWNER mlflow;
