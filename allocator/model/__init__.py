"""The model stage: loading (built-in GGUF models, GGUF files, HF directories), architecture facts,
corpora and token windows, and calibration activations collected block by block."""
