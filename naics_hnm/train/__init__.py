"""What needs the ``train`` extra (Lightning, transformers): datamodule, :class:`MiningData`, the mining
callback, encoder, frozen prefix, losses, evaluation callback, training report. Imports every lower layer."""
