"""The runtime stage: the packed model on disk, QuantLinear installation, the lean decoder, and the
decode loops measurements drive (timed greedy decoding, teacher-forced stepping)."""
