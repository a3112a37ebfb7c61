"""The training worker (the program torchrun starts, ``-m engine.train``): model, attention, batches,
the train loop, checkpoints, telemetry, and the sinks its events leave through."""
