"""Tools on the protocol library: collection runs, plots, the soak."""
