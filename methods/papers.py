"""The papers whose published numbers the methods declare (../shared/DESIGN.md, section 3).

Song et al. 2023, "Consistency Models" (arXiv 2303.01469): Table 1 (CIFAR-10, with the DDIM and
EDM baselines it quotes) and Table 2 (ImageNet 64x64, LSUN Bedroom 256 and LSUN Cat 256).
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (arXiv 2310.14189):
the iCT rows. Values are kept as printed, so a table shows the paper's own precision.
"""

CM_PAPER = "Song et al. 2023 (arXiv 2303.01469)"
ICT_PAPER = "Song & Dhariwal 2023 (arXiv 2310.14189)"
CM_TABLE1 = f"{CM_PAPER}, Table 1"
CM_TABLE2 = f"{CM_PAPER}, Table 2"
ICT_CIFAR = f"{ICT_PAPER}, Table 2 (iCT, not iCT-deep)"
ICT_IMAGENET = f"{ICT_PAPER}, Table 3 (iCT, not iCT-deep)"
