"""How good an encoder is without fine-tuning it: weighted k-NN (``knn``), the linear probe's
recipe and its cached-feature variant (``linprobe``, ``lars``), features of whole labelled sets
extracted by every rank (``features``), and the encoder-selection flags the evaluation launchers
share (``encoder_args``). The linear probe's training run is the ``bootmae_ds.linprobe`` job."""
