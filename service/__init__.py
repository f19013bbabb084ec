"""The digit recognition service: a FastAPI app serving a TorchScript MNIST model with dynamic batching."""

__version__ = "0.1.0"
