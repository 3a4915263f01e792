"""Megatron <-> Hugging Face bridge.

* ``rules``: the declarative name/shape rule engine (each family's rules live in
  ``r1mega/models/<family>/``, found through ``r1mega.models.registry``);
* ``hf_config``: r1mega ``ModelConfig`` <-> HF ``config.json`` (dispatching to the family's converters);
* ``export``: streaming, bucketed export of HF tensors from any TP/PP/EP layout (collective);
* ``importer``: HF safetensors -> shards of any layout;
* ``hf_dir``: whole HF directories (config, safetensors + index, tokenizer, generation config);
* ``fp8``: blockwise (128x128) FP8 quantisation of linear weights, DeepSeek-V3 style.

``rules`` imports neither torch.distributed collectives nor megatron (families below ``bridge`` use
it); the others import megatron through ``r1mega.models`` (which readies it for this machine).
"""
