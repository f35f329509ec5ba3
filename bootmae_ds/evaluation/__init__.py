"""How good an encoder is without fine-tuning it: weighted k-NN (``knn``), the linear probe
(``linprobe``), and the encoder-selection flags the evaluation launchers share (``encoder_args``)."""
