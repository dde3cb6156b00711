"""The evaluate stage: perplexity and KL against the reference, bit accounting, reports and plots."""
