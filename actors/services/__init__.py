"""The actors a daemon runs: dispatcher pools and workers, the completer, the heart,
the reaper, the scheduler and the control actor. Each module opens with its messages."""
