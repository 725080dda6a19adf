"""One fold of training: transforms, models and weights, the mixture sampler, the epoch engine, checkpoints and the k-fold trainer. Imports rockcls.core and rockcls.data."""
