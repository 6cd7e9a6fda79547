"""Datasets: the shared interfaces (:mod:`rclip.data.base`) and real datasets at paper scale."""
from rclip.data.base import RetrievalSet, TransformedImages, ZeroShotTask
from rclip.data.classification import PHOTO_TEMPLATES, load_descriptions, zeroshot_dataset
from rclip.data.inputs import CLASSIFICATION_SETS, paper_model, paper_tasks, robust_models
from rclip.data.retrieval import clean_caption, retrieval_dataset

__all__ = ["RetrievalSet", "TransformedImages", "ZeroShotTask", "PHOTO_TEMPLATES", "load_descriptions",
           "zeroshot_dataset", "clean_caption", "retrieval_dataset", "CLASSIFICATION_SETS", "paper_model",
           "paper_tasks", "robust_models"]
