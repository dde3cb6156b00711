"""llama.cpp's format: constants, GGUF export, scale folding in GGUF coordinates, the GGUF-native
profile, importance matrices, and evaluation in llama.cpp."""
