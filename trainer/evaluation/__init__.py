"""Helpers of `trainer.evaluate`: numpy metrics, Grad-CAM, matplotlib figures."""
