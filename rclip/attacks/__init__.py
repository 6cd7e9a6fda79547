"""Adversarial attacks: image attacks in [0, 1] pixel space (:mod:`rclip.attacks.image`)."""
from rclip.attacks.image import margin_loss, pgd

__all__ = ["pgd", "margin_loss"]
