"""The trainer job: MNIST in, a versioned SavedModel (and its report) out."""
