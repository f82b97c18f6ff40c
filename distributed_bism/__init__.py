"""distributed_bism."""
