"""The digit recognition service: a FastAPI app serving a TorchScript MNIST model with dynamic batching."""
