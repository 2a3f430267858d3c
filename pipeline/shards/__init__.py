"""The shards: writing them from the prepared index, their manifest, and reading them back to train and evaluate."""
