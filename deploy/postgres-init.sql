-- A second database for the MLflow tracking server beside the registry's own.
CREATE DATABASE mlflow OWNER registry;
