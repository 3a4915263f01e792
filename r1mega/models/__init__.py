"""Policy models on megatron-core. Importing this package readies megatron for this machine."""

from r1mega.platform.megatron_compat import ensure_megatron

ensure_megatron()
