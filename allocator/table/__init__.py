"""The table stage, data only: the sensitivity table, candidate options, loss names, and the bit map
a solver returns."""
