"""One configuration per alignment stage, each holding only the knobs its stage reads.

Every config refuses a key it does not hold (``extra="forbid"``, inherited from ``LoopConfig``), so a
recipe that sets, say, ``kl_weight`` on a stage that has no KL term fails to load, naming the stage
and the key, instead of training without it. A recipe names the stage of each config (``stage``),
which also picks the class where a recipe field accepts more than one stage.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from models.training_loop import LoopConfig


class StageConfig(LoopConfig):
    """The knobs every alignment stage reads."""

    stage: str
    temperature: float = Field(gt=0, description="InfoNCE temperature.")
    mse_weight: float = Field(default=0.0, ge=0, description="Weight of the squared distance to the target.")
    checkpoint_every: int = Field(default=50, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _only_this_stages_keys(cls, data: Any) -> Any:
        # extra="forbid" alone says "extra inputs are not permitted"; this names the stage and its keys.
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                stage = cls.model_fields["stage"].default
                raise ValueError(
                    f"stage {stage} has no setting {', '.join(map(repr, unknown))}; its settings are "
                    f"{', '.join(name for name in cls.model_fields if name != 'stage')}"
                )
        return data


class QueryStageConfig(StageConfig):
    """A stage that trains the query side (its encoder and its projection, each at its own rate)."""

    query_lr: float = Field(default=2e-5, gt=0)
    projection_lr: float = Field(default=1e-4, gt=0)
    bf16_autocast: bool = Field(
        default=False,
        description="Run the query encoder under CPU bf16 autocast (weights and the optimizer stay "
        "float32): ~4x faster steps where the CPU multiplies bf16 natively (AMX, AVX-512 BF16).",
    )


class DocumentDistillationConfig(StageConfig):
    """Warm start of the document side: its vectors pulled onto a teacher's."""

    stage: Literal["document_distillation"] = "document_distillation"
    document_lr: float = Field(default=1e-4, gt=0, description="LoRA; full top layers want ~1e-5.")
    documents_per_probe: int = Field(
        default=4, gt=0, description="Distillation with probes: documents drawn per probe query."
    )
    probe_temperature: float = Field(default=0.02, gt=0, description="Distillation with probes.")


class QueryAlignmentConfig(QueryStageConfig):
    """CARE stage I: the query side learns the frozen document side's vectors of self-pairs."""

    stage: Literal["query_alignment"] = "query_alignment"


class JointConfig(QueryStageConfig):
    """CARE stage II: both sides on (query, positive, negatives) groups."""

    stage: Literal["joint"] = "joint"
    document_lr: float = Field(default=1e-4, gt=0, description="LoRA; full top layers want ~1e-5.")
    negatives_per_group: int = Field(default=7, ge=0, description="Given negatives per query.")


class QueryRetrievalConfig(QueryStageConfig):
    """Stage II with the document side frozen: the query side against the whole corpus."""

    stage: Literal["query_retrieval"] = "query_retrieval"


class QueryDistillationConfig(QueryStageConfig):
    """The query side learns a frozen embedder's space from its labels and from the embedder itself."""

    stage: Literal["query_distillation"] = "query_distillation"
    kl_weight: float = Field(default=1.0, ge=0, description="Weight of the KL to the teacher's scores.")
    kl_temperature: float = Field(default=0.02, gt=0, description="Score temperature of the KL.")
    pseudo_per_step: int = Field(default=0, ge=0, description="Unlabelled pseudo-queries added to each step.")
    duplicate_cosine: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Documents at least this close to a query's positive are not its negatives "
        "(near-duplicate answers); None: only the labelled positives are masked.",
    )


class QueryPointwiseConfig(QueryStageConfig):
    """Stage I of a frozen-document alignment: the query side reproduces the teacher's own query
    vector of each unlabelled text (pointwise cosine; NanoVDR, LEAF), optionally plus the listwise KL
    of the teacher's ranking of the corpus."""

    stage: Literal["query_pointwise"] = "query_pointwise"
    temperature: float = Field(default=0.02, gt=0, description="Score temperature of the listwise KL.")
    kl_weight: float = Field(default=0.0, ge=0, description="Weight of the KL to the teacher's scores.")


# Stage II of the two-stage pipeline: the recipe's ``stage`` says which.
StageTwoConfig = Annotated[JointConfig | QueryRetrievalConfig, Field(discriminator="stage")]
