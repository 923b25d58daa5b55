"""fmrilm's Brainmarks plugin: every tokenizer exported with ``fmrilm export brainmarks ... --name
NAME`` is the model ``fmrilm_NAME`` (see :mod:`fmrilm.artifacts.brainmarks`)::

    python -m brainmarks.main_logistic fmrilm_NAME cls hcpya_sex
    python -m brainmarks.models.test_models fmrilm_NAME

Brainmarks imports this module (a portion of its namespace package ``brainmarks.models``)
when it looks for models.
"""

from functools import partial

from brainmarks.models.registry import register_model

from fmrilm.artifacts import brainmarks as export


def _model(rec: dict, **kwargs):
    return export.load(rec)


for _name, _rec in export.registered().items():
    register_model(_name)(partial(_model, _rec))
