"""dpldm: differentially private latent diffusion models (DP-LDM, arXiv 2305.15759).

Pretrain an autoencoder and a class-conditional latent diffusion model on public images, then
fine-tune only the attention modules on private images with DP-SGD, then sample.
"""
__version__ = "0.1.0"
