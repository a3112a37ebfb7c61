"""The engine process, one per run (``python -m engine.daemon RUN_DIR``, started by ``voxtui run``): it
supervises torchrun, stores and relays the workers' events, and answers clients. ``engine`` holds the
Engine, which ties ``sockets``, ``store`` (the event log), ``supervisor`` (torchrun), ``health``,
``requests``, ``inference`` and ``console``; ``launch`` holds ``voxtui run`` and
``voxtui engine list | status | stop``; ``replay`` a recorded run served by a real engine."""
