"""The quantize stage: applying an assignment (module -> quantizer) to a model, scale folding, the LM head."""
