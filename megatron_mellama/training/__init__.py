"""Training: optimizer, learning-rate schedule, gradient clipping, loss scaling, the engine and the loop."""
