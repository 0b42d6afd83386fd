"""Tiny random-weight models of the real architectures, each with a real fast tokenizer beside it.

They load through the same code paths as the real weights (AutoModel / AutoTokenizer / tokenizers
from a local directory) but build in well under a second, so fast tests can exercise padding,
pooling and truncation for real. Nothing here touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    Gemma3TextConfig,
    Gemma3TextModel,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3Model,
)

from models.manifest import ModelManifest, Pooling, write_manifest

# Enough common characters that Chinese medical test sentences tokenize to real ids, not <unk>.
COMMON_CHINESE = (
    "高血压糖尿病心脏肝炎头痛发烧咳嗽药医生患者治疗检查能吃吗的了是不在有"
    "我你他她它们这那个一二三四五六七八九十百千万年月日天时分钟小大多少上下左右前后中内外"
    "人体手足口眼耳鼻舌牙齿皮肤骨肉血液尿便胃肠肺肾脑神经腰背颈胸腹部关节肌"
    "疼痛酸胀麻木痒红肿热冷寒虚弱乏力恶心呕吐腹泻便秘失眠出汗呼吸困难喘"
    "感冒流鼻涕喉咙嗓子干哑痰症状疾慢急性期早晚服用片粒颗剂量次每饭后前空腹"
    "抗生素消炎止降压胰岛素阿司匹林布洛芬青霉头孢维生钙铁锌中西医院诊所科室"
    "护士专家手术住院门诊挂号化验超声影像拍片核磁共振指标正常异偏高低"
    "孕妇儿童老年男女婴幼可以应该需要注意避免禁忌过敏副作用反应风险安全"
    "饮食水果蔬菜肉蛋奶茶酒烟运动休息睡眠体重肥胖减营养盐油脂胆固醇"
    "怎么办为什么如何还会要就都也和与或但如果因所以吧呢啊请问谢好坏轻重"
    "感染病毒细菌癌肿瘤结石炎症溃疡贫出瘀伤骨折扭烫烧抑郁焦虑"
)
ASCII_PRINTABLE = "".join(chr(c) for c in range(33, 127))
FULLWIDTH_PUNCT = "，。？！、：；“”‘’（）《》【】…"

BERT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # XLM-R order: <pad> is id 1
DECODER_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def _vocab(specials: list[str]) -> dict[str, int]:
    tokens = list(specials)
    for ch in ASCII_PRINTABLE + FULLWIDTH_PUNCT + COMMON_CHINESE:
        if ch not in tokens:
            tokens.append(ch)
    return {tok: i for i, tok in enumerate(tokens)}


def _char_tokenizer(specials: list[str], unk: str) -> Tokenizer:
    """One token per non-space character; characters outside the vocab map to ``unk``."""
    tok = Tokenizer(models.WordLevel(vocab=_vocab(specials), unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex("."), behavior="isolated")]
    )
    tok.decoder = decoders.Fuse()
    return tok


def _save_bert_tokenizer(path: Path, max_len: int) -> PreTrainedTokenizerFast:
    tok = _char_tokenizer(BERT_SPECIALS, "<unk>")
    vocab = tok.get_vocab()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        cls_token="<s>",
        sep_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        model_max_length=max_len,
    )
    fast.save_pretrained(path)
    return fast


def _save_decoder_tokenizer(
    path: Path, add_bos: bool, max_len: int, add_eos: bool = False
) -> PreTrainedTokenizerFast:
    tok = _char_tokenizer(DECODER_SPECIALS, "<unk>")
    vocab = tok.get_vocab()
    if add_bos and add_eos:
        # Like EmbeddingGemma's tokenizer: <bos> text <eos>.
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>",
            pair="<bos> $A <eos> $B <eos>",
            special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
        )
    elif add_bos:
        # Like Gemma: <bos> is prepended, and no <eos> is added (the encoder appends it).
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_len,
    )
    fast.save_pretrained(path)
    return fast


def _save_model(model: PreTrainedModel, path: Path) -> None:
    model.eval()
    model.save_pretrained(path, safe_serialization=True)


def make_tiny_bert(path: Path, *, space: str = "tiny-bert-space", seed: int = 0) -> ModelManifest:
    """An XLM-R-shaped BertModel (hidden 32, 2 layers) with mean pooling and an e5-style prompt."""
    path.mkdir(parents=True, exist_ok=True)
    max_positions = 128
    tokenizer = _save_bert_tokenizer(path, max_positions)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    _save_model(BertModel(config), path)
    manifest = ModelManifest(
        name=path.name,
        role="document",
        format="hf",
        architecture="BertModel",
        pooling="mean",
        prompt="passage: {text}",
        max_tokens=64,
        dim=32,
        space=space,
        source=f"tests.tiny_models.make_tiny_bert(seed={seed})",
    )
    return write_manifest(path, manifest)


def make_tiny_decoder(
    path: Path,
    arch: Literal["gemma3", "qwen3"] = "gemma3",
    *,
    space: str = "tiny-llm-space",
    pooling: Pooling = "last_token",
    seed: int = 0,
) -> ModelManifest:
    """A 2-layer Gemma3 text model or Qwen3 model with a char-level tokenizer (Gemma-style <bos>)."""
    path.mkdir(parents=True, exist_ok=True)
    max_positions = 256
    tokenizer = _save_decoder_tokenizer(path, add_bos=arch == "gemma3", max_len=max_positions)
    special_ids = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
    }
    torch.manual_seed(seed)
    model: PreTrainedModel
    if arch == "gemma3":
        hidden = 48
        gemma_config = Gemma3TextConfig(
            hidden_size=hidden,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=24,
            max_position_embeddings=max_positions,
            sliding_window=16,  # smaller than the inputs, so the sliding layer is really exercised
            layer_types=["sliding_attention", "full_attention"],
            **special_ids,
        )
        model = Gemma3TextModel(gemma_config)
        architecture = "Gemma3TextModel"
    else:
        hidden = 32
        qwen_config = Qwen3Config(
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=max_positions,
            tie_word_embeddings=True,
            **special_ids,
        )
        model = Qwen3Model(qwen_config)
        architecture = "Qwen3Model"
    _save_model(model, path)
    manifest = ModelManifest(
        name=path.name,
        role="document",
        format="hf",
        architecture=architecture,
        decoder_only=True,
        pooling=pooling,
        prompt="{text}",
        max_tokens=64,
        dim=hidden,
        space=space,
        source=f"tests.tiny_models.make_tiny_decoder(arch={arch!r}, seed={seed})",
    )
    return write_manifest(path, manifest)


# EmbeddingGemma's sentence-transformers layout, shrunk: hidden 48 -> 2_Dense 64 -> 3_Dense 768.
TINY_ST_DIM = 768
TINY_ST_PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "STS": "task: sentence similarity | query: ",
}


def _write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _save_dense(folder: Path, in_features: int, out_features: int, *, bias: bool, activation: str) -> None:
    """A sentence-transformers Dense module folder, as sentence-transformers itself writes it."""
    weights = {"linear.weight": torch.randn(out_features, in_features) / in_features**0.5}
    if bias:
        weights["linear.bias"] = torch.randn(out_features) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    config = {
        "in_features": in_features,
        "out_features": out_features,
        "bias": bias,
        "activation_function": activation,
    }
    _write_json(folder / "config.json", config)


def make_tiny_st_embedder(path: Path, *, seed: int = 0) -> None:
    """An EmbeddingGemma-shaped sentence-transformers folder with random weights (no manifest).

    A 2-layer Gemma3TextModel with bidirectional attention, a tokenizer adding <bos> and <eos>,
    mean pooling over prompt and text, two Dense modules (2_Dense with bias and Tanh, 3_Dense without
    bias and Identity, like the real ones), Normalize, and query/document prompts.
    """
    path.mkdir(parents=True, exist_ok=True)
    max_positions = 256
    tokenizer = _save_decoder_tokenizer(path, add_bos=True, add_eos=True, max_len=max_positions)
    hidden = 48
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=24,
        max_position_embeddings=max_positions,
        sliding_window=16,  # shorter than the prompted inputs, so the window really cuts
        layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=True,
    )
    torch.manual_seed(seed)
    _save_model(Gemma3TextModel(config), path)
    _write_json(
        path / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
            {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
            {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(
        path / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    _save_dense(path / "2_Dense", hidden, 64, bias=True, activation="torch.nn.modules.activation.Tanh")
    _save_dense(path / "3_Dense", 64, TINY_ST_DIM, bias=False, activation="torch.nn.modules.linear.Identity")
    _write_json(
        path / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "prompts": TINY_ST_PROMPTS,
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": max_positions, "do_lower_case": False})
