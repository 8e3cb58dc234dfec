"""The three contrastive tasks of paper 3.3; each returns named loss components for eq. 6.

A task module is called as ``task(model, batch) -> {component: scalar loss}``; the model
(``ml.model.OmniSageModel``) supplies the embedders, the sampled-softmax machinery (logQ from the
count-min sketch, cross-rank negatives) and the inverse temperature lambda.
"""

from ml.tasks.entity_entity import EntityEntityTask
from ml.tasks.entity_feature import EntityFeatureTask
from ml.tasks.user_entity import UserEntityTask

__all__ = ["EntityEntityTask", "EntityFeatureTask", "UserEntityTask"]
