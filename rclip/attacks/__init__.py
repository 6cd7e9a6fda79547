"""Adversarial attacks: image attacks in [0, 1] pixel space (:mod:`rclip.attacks.image`) and adaptive attacks on
randomised defenses (:mod:`rclip.attacks.adaptive`)."""
from rclip.attacks.adaptive import eot_pgd
from rclip.attacks.image import ascend, autoattack, cw, fgsm, margin_loss, mim, pgd

__all__ = ["pgd", "cw", "fgsm", "mim", "autoattack", "eot_pgd", "ascend", "margin_loss"]
