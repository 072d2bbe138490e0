"""The data side without Lightning: token cache, pairs, curriculum, datasets, collate, samplers, config."""
