"""The query towers a frozen-document alignment can train, behind one type.

Both encode queries with gradients (``embed``), without (``encode``), and expose their trainable
state and its base values the same way, so the stages (models/align/train.py), the selection and the
query delta (models/align/artifacts.py) treat them alike:

- ``QueryTower``: a foreign BERT-family encoder (e5-small) with a projection into the teacher's dim;
- ``TeacherLayersTower``: the teacher's own first K layers and heads.
"""

from __future__ import annotations

from models.align.query_side import QueryTower
from models.align.teacher_layers import TeacherLayersTower

QueryStudent = QueryTower | TeacherLayersTower
