"""kubellm: build a large language model from scratch on Kubeflow.

The package layout (import name `kubellm`, source in `components/`):
  kubellm.core        storage (S3/local URIs), manifests, typed configs
  kubellm.model       the Llama-style transformer, presets, parallel layers, HF export/import
  kubellm.training    the engine shared by pretrain/SFT/DPO (DeepSpeed, loop, checkpoints, launch)
  kubellm.<stage>     data_prep, tokenizer, pretrain, sft, dpo, evaluate: config + run()
  kubellm.pipelines   KFP pipeline definitions (source in `pipelines/`)
"""

__version__ = "0.1.0"
