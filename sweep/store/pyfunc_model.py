"""A registered pruned network's code (MLflow "models from code": no pickle in the model). `registry.register_best`
saves this file as the model's code and MLflow runs it at load time: `PrunedNetwork.load_context` rebuilds the
network from the architecture record and the plan + state_dict checkpoint."""

import mlflow

from sweep.store.registry import PrunedNetwork

mlflow.models.set_model(PrunedNetwork())
