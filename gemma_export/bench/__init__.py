"""gemma-export bench: our runtime side by side with other engines on the same weights
(compare.py; one child script per engine in engines/)."""
