"""mnist-serve: the gRPC server.

A request travels: servicer.py (proto -> arrays) -> validation.py -> versions.py (which
model) -> batcher.py (merge requests) -> model.py (the SavedModel) -> back, split per request.
"""
