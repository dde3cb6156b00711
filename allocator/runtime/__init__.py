"""The runtime stage: the packed model on disk, QuantLinear installation, and the lean decoder."""
