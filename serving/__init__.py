"""Serving: a FAISS index of user embeddings kept current from the update feed, and the API.

Start reading at :mod:`serving.api` (``create_app`` wires everything), then
:mod:`serving.follower` (how the index follows the embedding feed) and
:mod:`serving.index` (the FAISS wrapper). Endpoints live one router per
resource under :mod:`serving.routes`; what they compute is in
:mod:`serving.queries`; Prometheus metrics in :mod:`serving.metrics`.
"""

from serving.api import create_app, serve
from serving.follower import IndexFollower
from serving.index import UserIndex

__all__ = ["IndexFollower", "UserIndex", "create_app", "serve"]
