"""Centre-side (Flower client) code: data preparation, sampling and local training."""
