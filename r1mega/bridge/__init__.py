"""Megatron <-> Hugging Face bridge.

* ``rules``: declarative per-architecture name/shape mapping (registry);
* ``hf_config``: r1mega ``ModelConfig`` <-> HF ``config.json``;
* ``export``: streaming, bucketed export of HF tensors from any TP/PP/EP layout (collective);
* ``importer``: HF safetensors -> shards of any layout;
* ``hf_dir``: whole HF directories (config, safetensors + index, tokenizer, generation config);
* ``fp8``: blockwise (128x128) FP8 quantisation of linear weights, DeepSeek-V3 style.

``rules`` and ``hf_config`` import neither torch.distributed collectives nor megatron; the others
import megatron through ``r1mega.models`` (which readies it for this machine).
"""
