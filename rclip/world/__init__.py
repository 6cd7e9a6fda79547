"""The offline world: procedurally rendered scenes of coloured shapes with exact ground truth.

See :mod:`rclip.world.scenes` (ground truth), :mod:`rclip.world.render` (pixels), :mod:`rclip.world.language`
(captions, lexicon) and :mod:`rclip.world.tasks` (zero-shot tasks, retrieval split, pre-training pairs).
"""
from rclip.world.attributes import COLOURS, COUNT_WORDS, POSITIONS, SHAPES, SIZES, TEXTURES
from rclip.world.language import LEXICON, Caption, CaptionSpec, Lexicon, captions_for, caption_scene, paraphrase, realise
from rclip.world.render import render
from rclip.world.scenes import Scene, WorldObject, sample_scene, scene_rng
from rclip.world.tasks import (TASK_NAMES, TASKS, WorldLabelled, WorldPairs, class_descriptions, retrieval_set,
                               spec_images, zeroshot_task)

__all__ = [
    "COLOURS", "COUNT_WORDS", "POSITIONS", "SHAPES", "SIZES", "TEXTURES", "LEXICON", "Caption", "CaptionSpec",
    "Lexicon", "captions_for", "caption_scene", "paraphrase", "realise", "render", "Scene", "WorldObject",
    "sample_scene", "scene_rng", "TASK_NAMES", "TASKS", "WorldLabelled", "WorldPairs", "class_descriptions", "retrieval_set",
    "spec_images", "zeroshot_task",
]
