"""kubellm.model — the Llama-style decoder shared by pretrain, SFT and DPO.

    from kubellm.model import Transformer, ModelConfig, get_preset
    model = Transformer(get_preset("debug"))
    logits = model(input_ids, doc_ids=doc_ids)       # (B, T, vocab)

Modules: `config` (shapes, presets), `layers` (the tensor-parallel seam), `transformer`
(architecture), `loss`, `flops` (parameter count, FLOPs/token), `hf` (LlamaForCausalLM
export/import), `generate` (KV-cache decoding and the `kubellm generate` command).
"""

from kubellm.model.checks import check_token_ids
from kubellm.model.config import ModelConfig, ModelSpec, get_preset
from kubellm.model.layers import LayerFactory
from kubellm.model.transformer import KVCache, Transformer

__all__ = ["KVCache", "LayerFactory", "ModelConfig", "ModelSpec", "Transformer", "check_token_ids",
           "get_preset"]
