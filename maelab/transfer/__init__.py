"""Transfer to dense tasks: an encoder as a backbone of feature maps (:mod:`~maelab.transfer.backbone`)
and the heads built on it."""
