"""Export-friendly torch modules, one file per graph."""
