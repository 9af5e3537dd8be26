"""Entry file of the logged MLflow Model (models from code): MLflow runs it to build the model."""

import mlflow

from pipeline.mlflow_model import DiffusionSampler

mlflow.models.set_model(DiffusionSampler())
