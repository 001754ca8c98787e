"""weightsmith: stream model weights into an artifact store, predict new ones, reassemble, vet."""

__version__ = "0.1.0"
