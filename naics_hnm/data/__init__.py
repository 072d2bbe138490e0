"""The data side without Lightning: token cache, counter RNG, pairs, curriculum, datasets, collate, epoch
sampler, resumable loader, config. Imports tree/, index/, mining/ and the top-level helpers."""
