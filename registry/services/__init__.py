"""Domain operations: the only place that combines the database, the blob store and the weight
math. The API, the CLI's admin commands and the workers all call these functions."""
