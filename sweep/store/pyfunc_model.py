"""The code of a registered pruned network (MLflow "models from code": no pickle in the model).

`sweep.store.registry.register_best` saves this file as the model's code; MLflow runs it at load time, and
`PrunedNetwork.load_context` rebuilds the network from the architecture record and the plan + state_dict checkpoint.
"""

import mlflow

from sweep.store.registry import PrunedNetwork

mlflow.models.set_model(PrunedNetwork())
