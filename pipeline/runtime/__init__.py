"""Process group and device set-up: torch.distributed/DeepSpeed init, CPU shared memory."""
