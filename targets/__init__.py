"""Build targets: one TOML file per device class, read by gemma_export/targets.py.

This folder is installed as the package `gemma_export.target_files` (setup.py maps it), so
`gemma-export --target NAME` works from a wheel as well as from a checkout. No code lives here.
"""
