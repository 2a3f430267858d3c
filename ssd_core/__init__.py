"""A pure-PyTorch SSD library: priors, box coding, matching, MultiBox loss, model, augmentation
(``ssd_core.augment``), post-processing and VOC metrics; ``ssd_core.reference`` holds the slow, literal
implementations the fast code is tested against.

It imports only torch, numpy and the standard library, takes plain arguments (never a config object),
and is usable on its own. Inside it, boxes are xyxy float32 normalised to [0, 1] and priors are cxcywh;
class 0 is background and ``num_classes`` includes it.
"""
