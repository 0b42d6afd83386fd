"""Realistic Chinese medical questions, built in so every run measures the same inputs.

They are patient-style questions: the benchmarks never print or log them, only their token counts.
"""

from __future__ import annotations

QUESTIONS: tuple[str, ...] = (
    "高血压病人能吃党参吗？",
    "乙肝转氨酶高怎么办？",
    "孩子发烧三十九度要不要马上去医院？",
    "糖尿病人空腹血糖多少算正常？",
    "长期失眠多梦应该挂哪个科？",
    "胃镜检查前需要空腹多长时间？",
    "怀孕早期感冒了可以吃什么药？",
    "腰椎间盘突出平时睡觉要注意什么？",
    "吃了头孢以后多久可以喝酒？",
    "甲状腺结节三级需要做手术吗？",
    "老人经常头晕是不是脑供血不足？",
    "小孩咳嗽有痰一直不好怎么办？",
    "布洛芬和对乙酰氨基酚哪个退烧效果好？",
    "尿酸高的人能不能喝啤酒吃海鲜？",
    "体检发现胆固醇偏高需要吃药吗？",
    "过敏性鼻炎每年春天都犯怎么根治？",
    "胸口闷痛喘不上气是心脏病吗？",
    "幽门螺杆菌阳性一定要治疗吗？",
    "湿疹反复发作用什么药膏比较好？",
    "月经推迟十天没来是怎么回事？",
    "膝盖疼上下楼梯更明显是什么原因？",
    "慢性胃炎平时饮食需要注意什么？",
    "宝宝腹泻拉水样便要补液吗？",
    "做完心脏支架手术以后能运动吗？",
)


def question_sources(count: int) -> list[str]:
    """``count`` long texts, each all questions joined starting from a different one, to cut
    inputs of a given token length from (every source is long enough for 64+ tokens)."""
    n = len(QUESTIONS)
    return ["".join(QUESTIONS[(i + j) % n] for j in range(n)) for i in range(count)]
