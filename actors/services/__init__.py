"""The actors a daemon runs: dispatcher pools and workers, the completer, the heart,
the reaper, the scheduler, the control actor and the peer (which daemon leads). Each
module opens with its messages."""
