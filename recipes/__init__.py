"""Lightning recipes: the fused model, data, training and the CLI."""
