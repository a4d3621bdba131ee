"""Evaluation with the paper's metrics: FID, SSIM, PSNR, LPIPS, L1, FID-VID and FVD (DESIGN.md)."""
