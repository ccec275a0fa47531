"""Training infrastructure shared by every command: loop, optimizer/schedule, distributed,
checkpoints, logs."""
