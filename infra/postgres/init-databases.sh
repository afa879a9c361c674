#!/bin/sh
# Runs once, when the postgres container starts on an EMPTY data volume
# (/docker-entrypoint-initdb.d). POSTGRES_DB (Prefect's database) exists already;
# this adds MLflow's database beside it. On a volume created before this script
# existed, create it by hand: psql -U "$POSTGRES_USER" -c 'CREATE DATABASE mlflow'.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -c 'CREATE DATABASE mlflow'
