"""Evaluation: ``voxtui infer`` / ``score`` / ``export`` (``infer``) and the metrics (``metrics``)."""
