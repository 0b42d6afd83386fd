"""The quality gate a fast path must pass before it encodes anything: its vectors of a fixed sample
must be within cosine ``MIN_GATE_COSINE`` of float32's, every one of them.

The sample is shipped here (deterministic, small, written for this purpose): Chinese medical
questions and answers of several lengths, the kind of text the index holds, plus a little English and
mixed script. It is encoded through the encoder's own pipeline (prompt, truncation, padding, pooling,
Dense head), once with the float32 model and once with the fast path.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

MIN_GATE_COSINE = 0.999
GATE_BATCH_SIZE = 8

GATE_TEXTS: tuple[str, ...] = (
    "高血压患者能吃党参吗？",
    "孩子发烧38.5度，咳嗽有痰，应该吃什么药",
    "乙型肝炎检查需要空腹吗？\n一般需要空腹，抽血前一天晚上十点以后不要吃东西，可以少量喝水。",
    "糖尿病人饮食注意什么\n建议控制总热量，少吃精制米面和含糖饮料，多吃蔬菜，"
    "水果放在两餐之间少量吃，定期监测空腹和餐后两小时血糖，按时服药或注射胰岛素。",
    "腰疼好几个月了，弯腰的时候更明显，晚上睡觉翻身也疼\n"
    "考虑腰肌劳损或者腰椎间盘突出的可能，建议去医院骨科做腰椎核磁共振检查明确诊断。"
    "平时注意休息，避免久坐和提重物，睡硬板床，可以做热敷和适度的腰背肌锻炼；"
    "如果出现下肢麻木、无力或者大小便异常，需要尽快就诊。",
    "胃疼，吃完饭以后胀，有时候反酸烧心\n这种情况多见于慢性胃炎或者胃食管反流，"
    "建议做胃镜检查，同时查一下幽门螺杆菌。饮食要规律，少吃辛辣油腻和生冷的食物，戒烟限酒，"
    "晚饭不要吃得太饱，饭后不要马上躺下。可以在医生指导下服用抑酸药和胃黏膜保护剂，"
    "症状一般两到四周会明显缓解，如果有消瘦、黑便或者吞咽困难，要及时复查。",
    "What are the early symptoms of type 2 diabetes?",
    "头痛 headache after 熬夜, 吃布洛芬 ibuprofen 可以吗",
    "怀孕三个月，感冒了，流鼻涕、嗓子疼，没有发烧，能吃药吗\n孕早期用药要谨慎，"
    "症状较轻时以多喝水、休息为主，可以用淡盐水漱口，注意保暖；如果体温超过38.5度或者症状加重，"
    "请到医院产科或者内科就诊，在医生指导下选择对胎儿影响小的药物，不要自行服用感冒药。",
    "宝宝六个月，湿疹反复发作，脸上和胳膊上都有红疹，很痒",
    "皮肤过敏起红疙瘩\n可以口服氯雷他定，外用炉甘石洗剂，避免接触过敏原。",
    "x",
)


class GateResult(BaseModel):
    """The gate's verdict; also the figures `medsearch bench precision` reports."""

    model_config = ConfigDict(frozen=True)

    precision: str  # the fast path that was checked
    passed: bool
    min_cosine: float
    mean_cosine: float
    texts: int
    threshold: float

    def summary(self) -> str:
        verdict = "passed" if self.passed else "failed"
        return (
            f"{self.precision} {verdict} the quality gate: min cosine {self.min_cosine:.5f} "
            f"(mean {self.mean_cosine:.5f}) to float32 over {self.texts} fixed texts, "
            f"threshold {self.threshold}"
        )


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b`` (non-finite rows count as -1)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosines = np.sum(a64 * b64, axis=1) / norms
    return np.where(np.isfinite(cosines), cosines, -1.0)


def check(
    precision: str, reference: np.ndarray, candidate: np.ndarray, threshold: float = MIN_GATE_COSINE
) -> GateResult:
    """Pass when every row of ``candidate`` is within cosine ``threshold`` of the same ``reference`` row."""
    cosines = row_cosines(reference, candidate)
    lowest = float(cosines.min()) if len(cosines) else 1.0
    return GateResult(
        precision=precision,
        passed=lowest >= threshold,
        min_cosine=lowest,
        mean_cosine=float(cosines.mean()) if len(cosines) else 1.0,
        texts=len(cosines),
        threshold=threshold,
    )
