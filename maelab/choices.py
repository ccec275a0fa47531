"""The fixed words and numbers that options offer (which pooling, which crop, which mask type, ...),
in one module without torch.

Every command's flags are built from these before anything heavy is imported, so `maelab <command>
--help` answers at once; the modules that implement each choice import the same names from here, so a
flag's choices and the code that runs them cannot drift apart.
"""

from __future__ import annotations

# models
POOLS = ("token", "avg")  # encoder features: the cls token after the final norm, or the mean of the patch tokens
MASK_TYPES = ("random", "block", "grid")  # the paper's random sampling; BEiT-style blocks; a regular grid (Fig. 6)

# data
CROPS = ("random-size", "fixed-size", "none")  # the paper's augmentation ablation (Table 1e)
EMPTY_POLICIES = ("skip", "keep")  # detection: training images without a usable annotation
SHARD_MANIFEST = "index.json"  # what `maelab shards make` writes last, naming every shard

# training
LR_SCHEDULES = ("cosine", "poly")  # after the linear warm-up

# transfer
SEGMENT_MODES = ("whole", "slide")  # segmentation inference: the whole image, or sliding crop-sized windows
ANCHOR_SIZES = (32, 64, 128, 256, 512)  # one per level, stride 4 .. 64 (detectron2 / torchvision FPN)
# ViTDet / torchvision sizes: head convolutions 256 wide, box fc 1024, 512 sampled RoIs per image, 2000
# (training) / 1000 (inference) RPN proposals per image
DETECTOR_HEADS = {"head_width": 256, "fc_width": 1024, "roi_batch": 512, "proposals": 2000}

# pictures
PICTURE_IMAGES = 8  # rows of the pictures a run draws of its own data
RECONSTRUCTION_PNG = "reconstruction.png"  # `maelab visualize`'s picture when --out names a folder
