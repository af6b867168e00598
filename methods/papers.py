"""The papers whose published numbers the methods declare (../shared/DESIGN.md, section 3).

Song et al. 2023, "Consistency Models" (arXiv 2303.01469): Table 1 (CIFAR-10, with the DDIM and
EDM baselines it quotes) and Table 2 (ImageNet 64x64, LSUN Bedroom 256 and LSUN Cat 256).
Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models" (arXiv 2310.14189):
the iCT rows. Geng et al. 2024, "Consistency Models Made Easy" (arXiv 2406.14548): ECT.
Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models"
(arXiv 2410.11081): sCT and sCD. Geng et al. 2025, "Mean Flows for One-step Generative
Modeling" (arXiv 2505.13447): MeanFlow. Values are kept as printed, so a table shows the
paper's own precision.
"""

CM_PAPER = "Song et al. 2023 (arXiv 2303.01469)"
ICT_PAPER = "Song & Dhariwal 2023 (arXiv 2310.14189)"
CM_TABLE1 = f"{CM_PAPER}, Table 1"
CM_TABLE2 = f"{CM_PAPER}, Table 2"
ICT_CIFAR = f"{ICT_PAPER}, Table 2 (iCT, not iCT-deep)"
ICT_IMAGENET = f"{ICT_PAPER}, Table 3 (iCT, not iCT-deep)"
ECT_PAPER = "Geng et al. 2024 (arXiv 2406.14548)"
SCM_PAPER = "Lu & Song 2024 (arXiv 2410.11081)"
MEANFLOW_PAPER = "Geng et al. 2025 (arXiv 2505.13447)"
ECT_CIFAR = f"{ECT_PAPER}, CIFAR-10 results (ECT, 1 and 2 steps)"
ECT_IMAGENET = f"{ECT_PAPER}, ImageNet 64x64 results (ECM-XL, EDM2 network)"
SCM_CIFAR = f"{SCM_PAPER}, CIFAR-10 results (1 and 2 steps)"
SCM_IMAGENET = f"{SCM_PAPER}, ImageNet 64x64 results (1 and 2 steps)"
MEANFLOW_CIFAR = f"{MEANFLOW_PAPER}, CIFAR-10 results (unconditional, 1 step)"
