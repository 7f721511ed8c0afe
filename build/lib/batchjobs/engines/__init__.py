"""Engine adapters. Import one only inside the process that runs it (it pulls in torch)."""
