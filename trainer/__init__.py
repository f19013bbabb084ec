"""The trainer job: MNIST in, a verified TorchScript artifact out."""
