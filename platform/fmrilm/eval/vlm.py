"""The VLM baseline's answers in an evaluation (``fmrilm eval`` with ``vlm: [<export>]``): each
held-out scan rendered as the export's training scans were (the same view, size and colour scale
fitted on its training scans), asked the evaluation's question (the first wording) in the model's
chat template; a class is the answer with the highest log-probability among the allowed ones, the
age is generated and parsed (the training scans' mean age where no number parses; the parse rate
is reported)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fmrilm.data.instructions import QUESTIONS, REGRESSION, Labeller


class VLMAnswerer:
    """One VLM export loaded once (its reload checked against the trained logits), answering the evaluation's questions."""

    def __init__(self, uri: str, series: dict[str, tuple[np.ndarray, float]]):
        from fmrilm.artifacts import vlm as artifact
        from fmrilm.features.images import ImageScale
        from fmrilm.models.vlm import family_of

        self.uri, self.series = uri, series  # scan_id -> ([rois, time], TR): the evaluation's scans, read once
        self.model, self.processor, self.meta = artifact.load(uri)
        self.family = family_of(self.model)
        self.scale = ImageScale.from_dict(self.meta["scale"])
        self.images: dict = {}

    @property
    def name(self) -> str:
        """The method name of this export's rows: ``vlm:<family>:<run name>``."""
        from fmrilm.artifacts.lm import run_of

        return f"vlm:{self.meta['family']}:{run_of(self.uri)}"

    def knows(self, task: str) -> bool:
        """Whether the export was tuned on ``task``."""
        return self.meta["tasks"].get(task, 0) > 0

    def render(self, scan_ids) -> None:
        """Render the scans not rendered yet."""
        from fmrilm.features.images import render

        view, size = self.meta["render"]["view"], self.meta["render"]["size"]
        self.images |= {s: render(self.series[s][0], view, self.scale, size) for s in scan_ids if s not in self.images}

    def answer(self, task: str, test: pd.DataFrame, labeller: Labeller, fallback: float) -> dict:
        """Predictions for the ``test`` scans (``pred``; ``scores [n, classes]`` of a class
        question; ``parse_rate`` of the age)."""
        from fmrilm.eval.scoring import parse_number
        from fmrilm.models.vlm import answer_logprobs, generate_answer

        self.render(test["scan_id"])
        question = QUESTIONS[task][0]
        if task in REGRESSION:
            said = [parse_number(generate_answer(self.model, self.family, self.processor, self.images[s], question)) for s in test["scan_id"]]
            parsed = [v for v in said if v is not None]
            return {"pred": np.asarray([fallback if v is None else v for v in said], float), "parse_rate": len(parsed) / max(1, len(said)),
                    "decoding": "greedy"}
        classes = labeller.classes[task]
        scores = np.stack([answer_logprobs(self.model, self.family, self.processor, self.images[s], question, classes)
                           for s in test["scan_id"]])
        return {"pred": np.array([classes[i] for i in scores.argmax(1)], dtype=object), "scores": scores}
