"""Adversarial attacks: image attacks in [0, 1] pixel space (:mod:`rclip.attacks.image`), adaptive attacks on
randomised defenses (:mod:`rclip.attacks.adaptive`), word-substitution attacks on captions (:mod:`rclip.attacks.text`)
and image-text retrieval attacks - PGD, Co-Attack, SGA - with their evaluation (:mod:`rclip.attacks.multimodal`)."""
from rclip.attacks.adaptive import eot_pgd
from rclip.attacks.image import ascend, autoattack, cw, fgsm, margin_loss, mim, pgd
from rclip.attacks.multimodal import (ATTACKS, RetrievalAttackConfig, RetrievalAttackResult, attack_retrieval,
                                      attack_success, co_attack, evaluate_attack, evaluate_attacks, pgd_retrieval,
                                      recall_table, scaled_views, sga)
from rclip.attacks.text import (STOPWORDS, LexiconSubstitutes, MaskedLMSubstitutes, TextAttackConfig,
                                UnseenSubstitutes, WordNetSubstitutes, meaning_kept_share, substitute_source,
                                substitution_kinds, text_attack, word_importance)

__all__ = ["pgd", "cw", "fgsm", "mim", "autoattack", "eot_pgd", "ascend", "margin_loss",
           "STOPWORDS", "LexiconSubstitutes", "UnseenSubstitutes", "WordNetSubstitutes", "MaskedLMSubstitutes",
           "TextAttackConfig", "meaning_kept_share", "substitute_source", "substitution_kinds", "text_attack", "word_importance",
           "ATTACKS", "RetrievalAttackConfig", "RetrievalAttackResult", "attack_retrieval", "attack_success",
           "co_attack", "evaluate_attack", "evaluate_attacks", "pgd_retrieval", "recall_table", "scaled_views", "sga"]
